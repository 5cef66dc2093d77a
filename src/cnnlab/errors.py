"""Errors the user can fix. The CLI prints them as one line (no traceback) and exits with code 2."""


class CnnlabError(Exception):
    """Base of every error that means 'your input needs fixing', never 'cnnlab has a bug'."""


class ConfigError(CnnlabError, ValueError):
    """A key, value or file of the config is wrong."""


class DataError(CnnlabError):
    """A data folder, image or download is missing or malformed."""


class StorageError(CnnlabError):
    """A file could not be written (disk full, quota, permissions, an I/O error); what was there is kept."""
