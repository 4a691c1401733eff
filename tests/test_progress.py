from ffmerge_onnx import progress


def test_off_a_terminal_a_long_loop_says_what_it_did_on_stderr_and_a_short_one_stays_quiet(capsys, monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):  # rich reads these as "a terminal"
        monkeypatch.delenv(name, raising=False)
    assert list(progress.track(range(3), "aligning")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # under LOG_AFTER_S
    monkeypatch.setattr(progress, "LOG_AFTER_S", 0.0)
    assert list(progress.track(iter(range(4)), "calibrating", total=4)) == [0, 1, 2, 3]
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("calibrating: 4 done in ") and out.err.endswith(" s\n")
    assert list(progress.track(range(2), "quiet", enabled=False)) == [0, 1]
    assert capsys.readouterr().err == ""
