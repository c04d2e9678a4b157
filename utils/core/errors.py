"""The error type for bad user input, and the list-flag reader every stage shares."""


class UserError(Exception):
    """Bad input from the user: one sentence saying what is wrong, where, and what to do instead."""


def as_list(value, flag):
    """Turn "a,b", ("a", "b") or ["a", "b"] (fire gives any of these) into a list of stripped names."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"--{flag} must be a comma-separated list of names, got {value!r}.")
    return [v.strip() for v in value if v.strip()]


