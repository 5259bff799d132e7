"""``wmss_ray.io.errors``: the user's mistakes told apart from bugs, through Ray's wrapping."""

from __future__ import annotations

from wmss_ray.io.errors import UserError, find_user_error, user_error_text


class _Wrapped(Exception):
    """Stands for ``ray.exceptions.RayTaskError``: the original exception rides in ``.cause``."""

    def __init__(self, cause):
        super().__init__("ray.exceptions.RayTaskError(CorpusError): ... traceback text ...")
        self.cause = cause


def test_the_concrete_errors_are_user_errors():
    from wmss_ray.cluster import AuthTokenError, RayUnreachableError
    from wmss_ray.config.schema import ConfigError
    from wmss_ray.data.rejects import CorpusError
    from wmss_ray.io.storage import StorageError
    from wmss_ray.models.loading import ModelDirError

    for cls in (ConfigError, CorpusError, StorageError, AuthTokenError, RayUnreachableError, ModelDirError):
        assert issubclass(cls, UserError), cls
    # the old bases stay, so existing `except ValueError / OSError / ConnectionError` still match
    assert issubclass(ConfigError, ValueError) and issubclass(StorageError, OSError)
    assert issubclass(RayUnreachableError, ConnectionError) and issubclass(ModelDirError, FileNotFoundError)


def test_found_through_cause_context_and_ray_wrapping():
    err = UserError("data.train: corpus /x does not exist")
    assert find_user_error(err) is err
    assert find_user_error(_Wrapped(err)) is err
    try:
        try:
            raise err
        except UserError as inner:
            raise RuntimeError("phase tokenize failed") from inner
    except RuntimeError as outer:
        assert find_user_error(outer) is err
    try:
        try:
            raise err
        except UserError:
            raise KeyError("while handling")  # noqa: B904 - an implicit __context__ chain
    except KeyError as outer:
        assert find_user_error(outer) is err


def test_a_bug_is_not_a_user_error():
    assert find_user_error(ValueError("shape mismatch")) is None
    assert find_user_error(_Wrapped(ZeroDivisionError())) is None
    assert find_user_error(None) is None


def test_text_is_at_most_three_lines():
    assert user_error_text(UserError("a\nb\nc\nd")) == "a\nb\nc"
    assert user_error_text(UserError("")) == "UserError"
