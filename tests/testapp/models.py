from knox.models import AuthToken


class ProxyToken(AuthToken):
    """Admin pages and querysets are often built on a proxy of the token model."""

    class Meta:
        proxy = True
        app_label = "testapp"
