"""User-facing errors: one line that names the place, what is wrong and what to do."""


class SftlabError(Exception):
    """An error the CLI prints as one line (no traceback unless --debug)."""


class DataError(SftlabError):
    """Bad input data; the message starts with file:line (or file:row N)."""


class ModelError(SftlabError):
    """A model or tokenizer that cannot be loaded or used as configured."""
