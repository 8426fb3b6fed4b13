"""An error for bad input found below the CLI, where no stage-specific error class fits."""


class InputError(ValueError):
    """Input the user can fix (a setting that does not fit the parent, ...); the CLI prints it as one line."""
