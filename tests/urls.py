from django.contrib import admin
from django.urls import path
from rest_framework.decorators import api_view
from rest_framework.response import Response

from knox_redis import metrics, views


@api_view(["GET"])
def whoami(request):
    return Response({"user": request.user.get_username(), "token_key": request.auth.token_key})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/login/", views.LoginView.as_view(), name="knox_login"),
    path("api/logout/", views.LogoutView.as_view(), name="knox_logout"),
    path("api/logoutall/", views.LogoutAllView.as_view(), name="knox_logoutall"),
    path("api/whoami/", whoami, name="whoami"),
    path("metrics", metrics.view, name="metrics"),
]
