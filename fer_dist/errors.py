"""The one error type the CLI turns into a one-line message and exit code 2."""


class FerDistError(Exception):
    """An expected failure caused by the user's input: bad path, bad file, bad config value.

    The message must be one line that names the file or field and says what is wrong.
    """
