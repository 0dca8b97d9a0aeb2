from django.urls import path
from rest_framework.decorators import api_view
from rest_framework.response import Response

from knox_redis.views import LoginView, LogoutAllView, LogoutView


@api_view(["GET"])
def whoami(request):
    return Response({"user": request.user.get_username()})


urlpatterns = [
    path("api/login/", LoginView.as_view()),
    path("api/logout/", LogoutView.as_view()),
    path("api/logoutall/", LogoutAllView.as_view()),
    path("api/whoami/", whoami),
]
