from django.apps import AppConfig


class KnoxRedisConfig(AppConfig):
    name = "knox_redis"
    verbose_name = "Knox Redis cache"

    def ready(self) -> None:
        from django.apps import apps
        from django.db.models.signals import post_save, pre_delete, pre_save

        from knox_redis import checks, signals  # noqa: F401  (checks register themselves)
        from knox_redis.users import token_models

        token_model, user_model = token_models()
        # The token model and its proxies: a delete through a proxy sends the proxy as sender,
        # and with no receiver for it Django would fast-delete without any signal.
        for model in apps.get_models():
            if model._meta.concrete_model is token_model._meta.concrete_model:
                uid = f"knox_redis.{model._meta.label}"
                pre_delete.connect(signals.revoke_before_delete, sender=model, dispatch_uid=f"{uid}.delete")
                pre_save.connect(signals.revoke_before_update, sender=model, dispatch_uid=f"{uid}.update")
                post_save.connect(signals.after_save, sender=model, dispatch_uid=f"{uid}.saved")

        # The user's row (USER_CACHE): every model whose save or delete changes it.
        tables = {user_model._meta.concrete_model, *user_model._meta.get_parent_list()}
        for model in apps.get_models():
            if tables & {model._meta.concrete_model, *model._meta.get_parent_list()}:
                uid = f"knox_redis.user.{model._meta.label}"
                pre_save.connect(signals.revoke_user_row_before_save, sender=model, dispatch_uid=f"{uid}.update")
                post_save.connect(signals.finish_user_row_revocation, sender=model, dispatch_uid=f"{uid}.saved")
                pre_delete.connect(signals.revoke_user_row_before_delete, sender=model, dispatch_uid=f"{uid}.delete")
