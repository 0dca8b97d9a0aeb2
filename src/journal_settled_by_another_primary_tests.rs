//! Review (Sentinel journal): revocations sent to an old primary are "settled" by the
//! confirmation of the new one.
//!
//! (Fixed: `settled` now carries the confirmed primary's generation; adapted to that.)
//!
//! `Journal::record` prunes with `settled` = `Resolver::confirmed_at()`, which is when the
//! sentinels last named the *current* primary, whatever generation the pruned entries went
//! to. Between the moment the sentinels name a new primary (generation 2, `confirmed_at` =
//! now) and the moment its catch-up lists what to re-send (`listed_for` = 2), `caught_up >=
//! listed_for` still holds (both 1), so a revocation that completes on a pooled generation-1
//! connection (checked out before the switch) drops every generation-1 entry older than
//! `now - MARGIN`, though nothing ever confirmed P1 after them (e.g. the sentinels were
//! unreachable, or backed off to 8 s, while the failover happened). The catch-up then re-sends
//! none of them, and the new primary still holds the tokens' records.

use super::tests::revocation;
use super::*;

#[test]
fn a_new_primarys_confirmation_does_not_settle_revocations_sent_to_the_old_one() {
    let journal = Journal::default();
    // Generation 1 (P1) in use, caught up.
    journal.caught_up.store(1, Ordering::Release);
    journal.kept.lock().listed_for = 1;
    // A logout sent to P1 at t0; the sentinels did not name P1 after it.
    assert!(!journal.record(1, revocation(), None));
    // t0 + 6 s: the sentinels name P2 (generation 2) and `confirmed_at` is now P2's. Before
    // P2's catch-up lists, a logout in flight on a generation-1 connection completes.
    let p2_confirmed = Instant::now() + MARGIN + Duration::from_millis(1);
    journal.record(1, revocation(), Some((2, p2_confirmed)));
    // P2's catch-up must re-send both.
    let pending = journal.kept.lock().entries.iter().filter(|e| e.generation < 2).count();
    assert_eq!(pending, 2, "the logout sent to P1 at t0 was dropped on P2's confirmation");
}
