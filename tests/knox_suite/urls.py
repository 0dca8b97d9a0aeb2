"""The URL names knox's tests reverse, served by knox_redis's views."""

from django.urls import path
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from knox_redis import views
from knox_redis.auth import TokenAuthentication


class RootView(APIView):
    authentication_classes = (TokenAuthentication,)
    permission_classes = (IsAuthenticated,)

    def get(self, request):
        return Response("api root")

    def post(self, request):
        return Response("api root")


urlpatterns = [
    path("api/", RootView.as_view(), name="api-root"),
    path("api/auth/login/", views.LoginView.as_view(), name="knox_login"),
    path("api/auth/logout/", views.LogoutView.as_view(), name="knox_logout"),
    path("api/auth/logoutall/", views.LogoutAllView.as_view(), name="knox_logoutall"),
]
