"""Outputs: checked before any work, written atomically, and a failed write (a full disk) leaves nothing behind."""
import errno
import sys

import pytest
from conftest import ROOT

from utils.core.errors import UserError
from utils.core.files import atomic_path, write_text_atomic

sys.path.insert(0, str(ROOT))


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "results.json"
    write_text_atomic(path, "old", "output_dir")
    with pytest.raises(RuntimeError):
        with atomic_path(path, "output_dir") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_full_disk_is_one_sentence_and_leaves_nothing(tmp_path):
    def fill_the_disk(tmp):
        tmp.write_bytes(b"x" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"could not write .*out.gguf \(No space left on device\); "
                                        r"free some disk space or pass another --output\."):
        with atomic_path(tmp_path / "out.gguf", "output") as tmp:
            fill_the_disk(tmp)
    assert list(tmp_path.iterdir()) == []


def test_export_on_a_full_disk_leaves_no_partial_gguf(tmp_path, monkeypatch, tiny_model_dir):
    import export_gguf
    from utils.export import gguf as gguf_export

    def partial_write(folder, path, *args, **kwargs):
        path.write_bytes(b"GGUF" + b"\0" * (1 << 20))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_export, "write_gguf", partial_write)
    out = tmp_path / "model.gguf"
    with pytest.raises(UserError, match="No space left on device"):
        export_gguf.main(model_path=str(tiny_model_dir), output=str(out))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags,message", [
    (dict(output="FILE"), r"--output=.*FILE is a file, not a folder"),
    (dict(outtype="q3_k_s"), r"--outtype='q3_k_s' is not one of"),
    (dict(modelfile="maybe"), r"--modelfile must be True or False"),
])
def test_export_flags_are_checked_first(tmp_path, flags, message):
    import export_gguf

    (tmp_path / "FILE").write_text("x")
    flags = {k: str(tmp_path / v) if v == "FILE" else v for k, v in flags.items()}
    with pytest.raises(UserError, match=message):
        export_gguf.main(model_path=str(tmp_path / "missing"), **flags)


@pytest.mark.parametrize("flags,message", [
    (dict(limit=-1), r"--limit must be at least 1, got -1"),
    (dict(few_shot="five"), r"--few_shot must be an integer \(at least 0\), got 'five'"),
    (dict(method="mc"), r"--method must be one of letter, cloze, got 'mc'"),
    (dict(output_dir="FILE"), r"--output_dir=.*FILE is a file, not a folder"),
    (dict(data_dir=None), r"--data_dir is required, e.g. --data_dir=path/to/cmmlu"),
])
def test_evaluate_flags_are_checked_first(tmp_path, flags, message):
    import evaluate

    (tmp_path / "FILE").write_text("x")
    flags = {k: str(tmp_path / v) if v == "FILE" else v for k, v in flags.items()}
    with pytest.raises(UserError, match=message):
        evaluate.main(**{"data_dir": str(tmp_path), **flags})


def test_finetune_full_disk_at_a_checkpoint_removes_it(finetune, tmp_path, monkeypatch):
    """The disk fills while checkpoint-2 is written: one sentence, checkpoint-2 removed, nothing half-written."""
    from transformers import Trainer

    def full_disk(self, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_rng_state", full_disk)
    with pytest.raises(UserError, match=r"writing to .*out failed \(No space left on device\); "
                                        r"removed the cut-short checkpoint-2; "
                                        r"free some disk space, then continue with --resume_from_checkpoint=True\."):
        finetune(max_steps=4)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_finetune_full_disk_at_the_final_save_replaces_nothing(finetune, tmp_path, monkeypatch):
    from utils.train import run_output

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_output, "write_run_config", full_disk)
    with pytest.raises(UserError,
                       match=r"saving the adapter into .*out failed \(No space left on device\); nothing was replaced"):
        finetune(max_steps=2)
    # complete: a resume can go on from it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-2"]


def test_resume_passes_over_a_cut_short_checkpoint(finetune, tmp_path, capsys):
    finetune(max_steps=4)
    (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hist')  # cut short
    capsys.readouterr()
    finetune(max_steps=4, resume_from_checkpoint=True)
    assert ("resuming from checkpoint-2; passed over checkpoint-4, cut short by an earlier run"
            in capsys.readouterr().out)
    not_a_checkpoint = tmp_path / "notes"
    not_a_checkpoint.mkdir()
    with pytest.raises(UserError, match=r"--resume_from_checkpoint: .*notes is not a complete checkpoint "
                                        r"\(it lacks adapter_model.safetensors, "
                                        r"adapter_config.json, optimizer.pt, scheduler.pt, trainer_state.json\)"):
        finetune(max_steps=4, resume_from_checkpoint=str(not_a_checkpoint))
