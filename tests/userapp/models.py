"""Models that write the stock user's row besides the user model itself (USER_CACHE revokes a
cached row on each): a proxy and a multi-table child. Not installed with tests.settings_uuid,
whose user model is another."""

from django.contrib.auth.models import User
from django.db import models


class UserProxy(User):
    """Admin pages often edit users through a proxy: its saves send the proxy as sender."""

    class Meta:
        proxy = True
        app_label = "userapp"


class Customer(User):
    """A multi-table child of the user model: its saves write the user's row too."""

    loyalty = models.IntegerField(default=0)

    class Meta:
        app_label = "userapp"
