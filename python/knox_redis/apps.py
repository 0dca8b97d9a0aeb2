from django.apps import AppConfig


class KnoxRedisConfig(AppConfig):
    name = "knox_redis"
    verbose_name = "Knox Redis cache"

    def ready(self) -> None:
        from django.db.models.signals import post_save, pre_delete, pre_save
        from knox.models import get_token_model

        from knox_redis import checks, signals  # noqa: F401  (checks register themselves)

        token_model = get_token_model()
        uid = "knox_redis"
        pre_delete.connect(signals.revoke_before_delete, sender=token_model, dispatch_uid=f"{uid}.delete")
        pre_save.connect(signals.revoke_before_update, sender=token_model, dispatch_uid=f"{uid}.update")
        post_save.connect(signals.mark_saved, sender=token_model, dispatch_uid=f"{uid}.saved")
