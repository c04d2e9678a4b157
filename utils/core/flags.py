"""Flag checking for every stage script, before any work: unknown flags (with a "did you mean"), and each
value converted and range-checked, every problem gathered into one UserError, as litgpt's validate_args does.

python-fire hands `main` whatever the command line held: "007" becomes an int, "1e-4" a float, "a,b" a tuple,
and a flag main does not take is only reported after main has returned. `unknown_flags` runs before fire;
`Checks` converts the values main receives.
"""
import difflib
import inspect

from utils.core.errors import UserError, as_list

FIRE_FLAGS = {"help", "h"}  # fire's own, also accepted before its "--" separator


def _flag(arg):
    """(name, "=value" or "") of a flag as fire reads it (--name, -name, --name-with-dashes), or None for a value
    (also a negative number)."""
    if not arg.startswith("-") or arg == "--" or not (arg[1:2].isalpha() or arg[2:3].isalpha()):
        return None
    name, sep, value = arg.lstrip("-").partition("=")
    return name.replace("-", "_"), sep + value


def unknown_flags(main, argv, aliases=None, dash="--"):
    """Names of --flags in argv (older names already `renamed`) that main does not take, each with a suggestion
    (an older name suggests the current one); fire would run main first. `dash` is what the message puts before
    each name ("" for the keys of a --config file)."""
    aliases = aliases or {}
    names = set(inspect.signature(main).parameters)
    problems = []
    for arg in argv:
        if arg == "--":
            break  # what follows is for fire itself (--help, --trace)
        if _flag(arg) is None:
            continue
        name = _flag(arg)[0]
        if name in names or name in FIRE_FLAGS or (name.startswith("no") and name[2:] in names):
            continue  # fire reads --noflag as --flag=False
        close = difflib.get_close_matches(name, sorted(names | set(aliases)), n=1, cutoff=0.7)
        problems.append(f"{dash}{name} is not a flag of this script"
                        + (f" (did you mean {dash}{aliases.get(close[0], close[0])}?)" if close else ""))
    return problems


def renamed(argv, aliases):
    """argv with older flag names (`aliases`: old -> current) written as the current ones, and the problems of
    a flag given under both names."""
    out, seen, problems = [], {}, []
    for arg in argv:
        if arg == "--":
            out += argv[len(out):]
            break
        name, value = _flag(arg) or ("", "")
        negated = name.startswith("no") and name[2:] in aliases
        old = name[2:] if negated else name
        if old in aliases:
            arg = f"--{'no' if negated else ''}{aliases[old]}{value}"
        current = aliases.get(old, old)
        if current and current in seen and seen[current] != old:
            problems.append(f"pass either --{current} or its older name --{old if old != current else seen[current]}, "
                            "not both")
        if current:
            seen.setdefault(current, old)
        out.append(arg)
    return out, problems


class Checks:
    """Collects problems while converting flags: each method returns the converted value (or the value as
    given when it is bad) and records what is wrong; `done()` raises them all as one UserError."""

    def __init__(self):
        self.problems = []

    def add(self, problem):
        """Record a problem; None (no problem) is passed over."""
        if problem:
            self.problems.append(problem)

    def call(self, function, *args, default=None):
        """function(*args), for checks that raise: a UserError becomes one of the problems, and `default` is
        returned in its place."""
        try:
            return function(*args)
        except UserError as e:
            self.add(str(e).rstrip("."))
            return default

    def names(self, name, value):
        """A comma-separated list of names ("a,b", or the tuple fire makes of it) as a list of names."""
        return self.call(as_list, value, name, default=[])

    def done(self, hint="run with --help for every flag"):
        if self.problems:
            raise UserError("; ".join(self.problems) + f" ({hint}).")

    def boolean(self, name, value):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        self.add(f"--{name} must be True or False, got {value!r}")
        return value

    def integer(self, name, value, low=None, high=None, none=False):
        """An int in [low, high]; None passes when none=True. "8" and 8.0 are 8; 8.5, "abc" and True are not."""
        if value is None and none:
            return None
        try:
            number = int(value) if not isinstance(value, str) else int(float(value)) if value.strip() else None
            if isinstance(value, bool) or number is None or float(value) != number:
                raise ValueError
        except (TypeError, ValueError):
            self.add(f"--{name} must be an integer{_range(low, high, parens=True)}, got {value!r}")
            return value
        if (low is not None and number < low) or (high is not None and number > high):
            self.add(f"--{name} must be {_range(low, high).strip()}, got {value!r}")
        return number

    def number(self, name, value, low=None, high=None, below_high=False, above_low=False, none=False):
        """A float in [low, high] (or the open ends asked for); None passes when none=True."""
        if value is None and none:
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if number != number:  # nan
                raise ValueError
        except (TypeError, ValueError):
            self.add(f"--{name} must be a number{_range(low, high, above_low, below_high, parens=True)}, got {value!r}")
            return value
        if (low is not None and (number < low or (above_low and number == low))) or \
                (high is not None and (number > high or (below_high and number == high))):
            self.add(f"--{name} must be {_range(low, high, above_low, below_high).strip()}, got {value!r}")
        return number

    def choice(self, name, value, choices):
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        self.add(f"--{name} must be one of {', '.join(map(str, choices))}, got {value!r}"
                 + (f" (did you mean {close[0]}?)" if close else ""))
        return value

    def text(self, name, value, required=False, example=None):
        """A string (fire turns "007" into 7: numbers become their text again); required refuses None and ""."""
        if value is None or value == "":
            if required:
                self.add(f"--{name} is required" + (f", e.g. --{name}={example}" if example else ""))
            return None if value is None else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            self.add(f"--{name} must be a single value, got {value!r}")
        return value


def _range(low, high, above_low=False, below_high=False, parens=False):
    """ "at least 1", "above 0", "from 0 to below 1", ... ; in parentheses after a type when parens."""
    if low is not None and high is not None:
        phrase = f"{'above' if above_low else 'from'} {low} {'to below' if below_high else 'to'} {high}"
    elif low is not None:
        phrase = f"{'above' if above_low else 'at least'} {low}"
    elif high is not None:
        phrase = f"{'below' if below_high else 'at most'} {high}"
    else:
        return ""
    return f" ({phrase})" if parens else f" {phrase}"


NOT_REPEATED = ("config", "overwrite_output_dir", "resume_from_checkpoint", "dry_run")  # per run, not per recipe


def config_flags(main, argv, aliases=None):
    """argv with the flags of --config=FILE put before the command line's (which win: a flag the command line
    gives is not taken from the file). FILE is a JSON or YAML mapping of flag names to values, as
    LLaMA-Factory's, or a run_config.json (its "flags"). Returns (argv, problems); an unknown key is refused as
    an unknown flag is."""
    aliases = aliases or {}
    at = next((i for i, a in enumerate(argv) if a == "--" or (_flag(a) or ("",))[0] == "config"), None)
    if at is None or argv[at] == "--":
        return argv, []
    value = _flag(argv[at])[1][1:] if "=" in argv[at] else (argv[at + 1] if at + 1 < len(argv) else "")
    try:
        values = _read_config(value)
    except UserError as e:
        return argv, [str(e).rstrip(".")]
    given = {(_flag(a) or ("",))[0] for a in argv[:argv.index("--") if "--" in argv else len(argv)]}
    given |= {n[2:] for n in given if n.startswith("no")}  # --noflag gives flag
    problems, flags = [], []
    for key, v in values.items():
        name = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
        if name in NOT_REPEATED:
            continue
        unknown = unknown_flags(main, [f"--{name}"], aliases, dash="")
        if unknown:
            problems.append(f"--config={value}: key {unknown[0]}")
        elif name not in given:
            flags.append(f"--{name}={v!r}")  # fire reads Python literals: the file's value exactly
    return flags + argv, problems


def _read_config(path):
    """The mapping of flags in a --config file (a run_config.json gives the flags that run was started with)."""
    import json
    from pathlib import Path

    file = Path(str(path)).expanduser()
    if file.suffix not in (".json", ".yaml", ".yml") or not file.is_file():
        raise UserError(f"--config={path} is not a .json, .yaml or .yml file that exists; pass a run's "
                        "run_config.json or a file of flags")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # json, yaml and decoding errors: all the same to the user
        said = " ".join(str(e).split())  # yaml's messages span lines
        raise UserError(f"--config={path} does not parse ({type(e).__name__}: {said}); fix the file") from None
    if isinstance(values, dict) and "base_model_path" in values:  # a run config
        if not isinstance(values.get("flags"), dict):
            raise UserError(f"--config={path} is a run config from a lora-kit that did not record its flags; "
                            "pass the flags again, or a YAML/JSON file of them")
        values = values["flags"]
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise UserError(f"--config={path} must hold a mapping of flag names to values, e.g. learning_rate: 0.0002")
    return values


# finetune's --optim and --lr_scheduler_type: transformers' names (tests/test_flags.py checks each against its enum);
# the schedulers are those that need no extra arguments
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor",
              "sgd")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
REPORT_TO = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "swanlab": ("swanlab",),
             "mlflow": ("mlflow",)}  # --report_to: the Trainer's name -> the packages that provide it


def report_to_list(value):
    """--report_to: "none", or names from REPORT_TO (comma-separated), each with its package installed."""
    import importlib.util

    names = as_list(value, "report_to") or ["none"]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise UserError(f"--report_to must be none or some of {', '.join(REPORT_TO)}, got {', '.join(unknown)}")
    missing = [n for n in names if not any(importlib.util.find_spec(p) for p in REPORT_TO[n])]
    if missing:
        raise UserError(f"--report_to={','.join(missing)} needs its package: pip install {' '.join(missing)}")
    return names


def recorded_flags(flags):
    """The flags of a run as run_config.json keeps them for --config: those that make a recipe (not
    --overwrite_output_dir, --resume_from_checkpoint, --dry_run), paths that exist made absolute, so that
    the run can be repeated from any folder."""
    from pathlib import Path

    def absolute(value):
        if isinstance(value, (list, tuple)):
            return [absolute(v) for v in value]
        if isinstance(value, str) and "://" not in value and value and Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        return value

    return {name: absolute(value) for name, value in flags.items() if name not in NOT_REPEATED}
