"""Trainer callbacks for every run: real tokens per second, and the whole run's loss across a resume."""


def throughput_callback():
    """A TrainerCallback that measures real (non-pad) tokens per second after the first update (warm-up)."""
    import time

    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        start = None
        tokens_per_second = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)
            else:
                seconds = time.perf_counter() - self.start[0]
                self.tokens_per_second = (state.num_input_tokens_seen - self.start[1]) / max(seconds, 1e-9)

    return Throughput()


def run_loss_callback():
    """A TrainerCallback for the whole run's mean training loss, also after a resume, where the Trainer's own
    `training_loss` covers only the steps of the resumed call. It logs at every checkpoint, so the logged
    windows saved with a checkpoint cover every step before it."""
    from transformers import TrainerCallback

    class RunLoss(TrainerCallback):
        first_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.first_step = state.global_step  # the checkpoint's step when resuming

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                control.should_log = True

        def mean(self, state, training_loss):
            """(steps before the resume: their logged windows' losses, weighted by length) + this call's mean."""
            before, last = 0.0, 0
            for entry in state.log_history:
                if "loss" in entry and entry["step"] <= self.first_step:
                    before += entry["loss"] * (entry["step"] - last)
                    last = entry["step"]
            steps = state.global_step - self.first_step
            return (before + training_loss * steps) / max(state.global_step, 1)

    return RunLoss()
