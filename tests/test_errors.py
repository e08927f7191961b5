"""Every error class has exactly one HTTP mapping, in OpenAI's shape."""

from api.errors import describe
from scheduler import errors


def all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *all_subclasses(sub)]
    return out


def test_every_error_maps_to_an_openai_error_object() -> None:
    classes = all_subclasses(errors.MlxdError)
    assert len(classes) >= 7
    for cls in classes:
        status, body = describe(cls("boom", param="x"))
        assert 400 <= status < 600
        assert body == {
            "error": {
                "message": "boom",
                "type": body["error"]["type"],
                "param": "x",
                "code": body["error"]["code"],
            }
        }
        assert body["error"]["type"] in {
            "invalid_request_error",
            "rate_limit_error",
            "server_error",
        }


def test_specific_codes() -> None:
    assert describe(errors.ContextLengthExceeded("m"))[0] == 400
    assert (
        describe(errors.ContextLengthExceeded("m"))[1]["error"]["code"] == "context_length_exceeded"
    )
    assert describe(errors.ModelNotFound("m"))[0] == 404
    assert describe(errors.RunnerCrashed("m"))[0] == 502
    assert describe(errors.QueueFull("m"))[0] == 429
    assert describe(errors.QueueTimeout("m"))[1]["error"]["code"] == "queue_timeout"
    assert describe(errors.ModelTooLarge("m"))[:1] == (503,)
