"""The core every stage stands on: user errors, the CLI runner, flag checks, files, the host machine, and the run
folder the stages hand each other."""
