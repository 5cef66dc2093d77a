"""Errors the user can fix. The CLI prints them as one line (no traceback) and exits with code 2."""


class CnnlabError(Exception):
    """Base of every error that means 'your input needs fixing', never 'cnnlab has a bug'."""


class ConfigError(CnnlabError, ValueError):
    """A key, value or file of the config is wrong."""


class DataError(CnnlabError):
    """A data folder, image or download is missing or malformed."""


class StorageError(CnnlabError):
    """A file could not be written (disk full, quota, permissions, an I/O error); what was there is kept."""


def first_line(e: BaseException) -> str:
    """What an exception says, on one line: its message's first line, or its class's name where it says nothing."""
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def quote(value: object, limit: int = 80) -> str:
    """repr(value) for an error message, at most about `limit` characters however large the value is (a YAML
    value of millions of items is abridged while it is printed, never printed whole first)."""
    import reprlib

    short = reprlib.Repr()  # attributes, not keywords: Python 3.10 and 3.11 take none
    short.maxlevel, short.maxdict, short.maxlist, short.maxtuple, short.maxset = 3, 6, 6, 6, 6
    short.maxstring, short.maxother, short.maxlong = limit, limit, 40
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
