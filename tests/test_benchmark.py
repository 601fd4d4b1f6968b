"""scripts/benchmark.py runs end to end at toy sizes and reports every stage of the map, both decoding parts included."""

import pytest

from scripts import benchmark


def test_benchmark_reports_every_stage(tmp_path, single_thread) -> None:
    args = ["--device", "cpu", "--cases", "2d,3d", "--size-2d", "32", "--size-3d", "16", "--levels", "2",
            "--vqvae-channels", "8", "--codebook", "16", "--embedding-dim", "4", "--embed-dim", "16", "--layers", "1",
            "--heads", "2", "--num-samples", "3", "--num-decodes", "2", "--kde-reconstructions", "12",
            "--repeats", "2", "--json", str(tmp_path / "b.json")]  # fmt: skip
    rows = benchmark.main(args)
    assert [r["case"] for r in rows] == ["2d", "3d"]
    for row in rows:
        assert row["identical"] is True and row["map_R"] == 6
        assert row["map_decode_shared_s"] > 0 and row["map_decode_dropout_s"] > 0 and row["map_s"] > 0
        assert row["map_min_s"] <= row["map_s"] <= row["map_max_s"] and row["cached_min_s"] <= row["cached_s"]
        assert row["map_same"] is True and row["map_before_s"] > 0  # 0.2.0's decoding, same map, same run
        assert row["kde_evals"] == 12 * 32 ** (2 if row["case"] == "2d" else 0) * 16 ** (
            3 if row["case"] == "3d" else 0
        )
        assert row["cached_tokens"] <= row["naive_tokens"]
        assert row["cached_tokens_per_s"] == pytest.approx(row["cached_tokens"] / row["cached_s"])
    assert (tmp_path / "b.json").is_file()


@pytest.mark.parametrize(
    "argv, says",
    [(["--cases", "4d"], "--cases '4d'"), (["--cases", ""], "--cases ''"), (["--flag-fraction", "0"], "strictly"),
     (["--repeats", "0"], "at least 1"), (["--json", "/no/such/folder/b.json"], "its folder does not exist"),
     (["--num-samples", "0"], "--num-samples 0: at least 1"), (["--size-2d", "30", "--levels", "2"], "multiple of"),
     (["--cases", "3d", "--levels", "6", "--size-3d", "32"], "--size-3d 32: a multiple of 2**levels = 64"),
     (["--embed-dim", "30", "--heads", "8"], "a multiple of --heads 8")],
)  # fmt: skip
def test_bad_arguments_stop_before_any_timing(argv, says, capsys) -> None:
    from scripts.benchmark import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert says in capsys.readouterr().err


def test_flags_take_underscores_as_the_other_scripts_do() -> None:
    from scripts.benchmark import parse_args

    args = parse_args(["--size_2d", "64", "--num_samples=7", "--skip_naive", "--json", "a_b.json"])
    assert (args.size_2d, args.num_samples, args.skip_naive, args.json) == (64, 7, True, "a_b.json")
