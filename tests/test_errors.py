"""Every error class has exactly one HTTP mapping, in OpenAI's shape."""

from api.errors import STATUS, describe
from scheduler import errors


def all_subclasses(cls: type[errors.MlxdError]) -> list[type[errors.MlxdError]]:
    out: list[type[errors.MlxdError]] = []
    for sub in cls.__subclasses__():
        out += [sub, *all_subclasses(sub)]
    return out


def test_every_error_class_is_mapped_explicitly() -> None:
    """A new error class needs a line of its own in ``api.errors.STATUS``: one
    that fell back to its base's mapping would give clients the base's code."""
    classes = all_subclasses(errors.MlxdError)
    assert len(classes) >= 13
    unmapped = [cls.__name__ for cls in classes if cls not in STATUS]
    assert unmapped == []


def test_every_error_maps_to_an_openai_error_object() -> None:
    for cls in all_subclasses(errors.MlxdError):
        status, body = describe(cls("boom", param="x"))
        assert (status, body["error"]["code"]) == STATUS[cls][::2]  # its own, not its base's
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
