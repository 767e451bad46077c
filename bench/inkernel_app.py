"""The app both servers of bench/inkernel.py serve: a minimal ASGI app and a FastAPI JSON route."""
from fastapi import FastAPI


async def plain(scope, receive, send):  # noqa: ANN001, ANN201 - the smallest ASGI app: what the server costs
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


fastapi_app = FastAPI()


@fastapi_app.get("/json")
def small_json() -> dict:
    return {"ok": True}
