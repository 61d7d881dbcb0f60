from asymflow.progress import EpochBars


def test_epoch_bars_count_epochs_after_a_resume_and_steps_per_epoch() -> None:
    with EpochBars(False, "run") as bars:
        bars.stage("epochs", total=5, done=2)
        bars.start_batches("epoch 3", 4)
        for _ in range(4):
            bars.batch("loss 0.1")
        bars.epoch_done("acc 0.9")
        tasks = {t.description: t for t in bars.progress.tasks}
        assert tasks["run epochs"].completed == 3
        assert tasks["  epoch 3"].completed == 4
        bars.start_batches("epoch 4", 4)  # replaces the inner bar
        assert [t.description for t in bars.progress.tasks] == ["run epochs", "  epoch 4"]
        bars.epoch_at(5, "done")
        assert bars.progress.tasks[0].completed == 5
        bars.stage("stage 2", total=3, done=0)  # a new stage drops the inner bar
        assert [t.description for t in bars.progress.tasks][-1] == "run stage 2"
        assert "  epoch 4" not in [t.description for t in bars.progress.tasks]
