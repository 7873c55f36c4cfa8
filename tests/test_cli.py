"""The command line, run as a user runs it: subprocesses, exit codes, one-line errors."""
import importlib.util
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

GPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpt.py")
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "1", "--device", "cpu"]


def run(*args, check=True):
    proc = subprocess.run([sys.executable, GPT, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare_text):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "play.txt").write_text(shakespeare_text, encoding="utf-8")
    out = folder / "out"
    proc = run("train", "--data", folder / "play.txt", "--out_dir", out, "--max_iters", 3, "--eval_interval", 2, *TINY)
    return folder, out, proc


def test_train_prints_losses_perplexity_and_a_sample(trained):
    _, out, proc = trained
    assert "kernels:" in proc.stdout
    assert "parameters (1 layers, 32 wide, context 32)" in proc.stdout  # sizes given: no preset's name
    assert proc.stdout.count("| val loss") == 2 and "ppl" in proc.stdout and "sample: ROMEO:" in proc.stdout
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt-00000001.pt", "ckpt-00000003.pt", "losses.png", "metrics.jsonl"]


def test_eval_prints_loss_and_perplexity(trained):
    folder, out, _ = trained
    proc = run("eval", "--out_dir", out)
    assert proc.stdout.startswith("loss ") and "perplexity" in proc.stdout and "validation split" in proc.stdout
    proc = run("eval", "--out_dir", out, "--data", folder / "play.txt", "--eval_iters", 2)
    assert "2 batches" in proc.stdout


def test_sample_is_reproducible_with_a_seed(trained):
    _, out, _ = trained
    args = ["sample", "--out_dir", out, "--max_new_tokens", 20, "--seed", 7, "--temperature", 0.8, "--top_k", 50]
    first, second = run(*args).stdout, run(*args).stdout
    assert first == second and first.startswith("ROMEO:\n") and len(first) > len("ROMEO:\n")
    assert run(*args[:-4], "--seed", 8, "--top_p", 0.9).stdout != first
    greedy = run("sample", "--out_dir", out, "--max_new_tokens", 10, "--temperature", 0, "--num_samples", 2)
    samples = greedy.stdout.split("--- sample 2\n")
    assert samples[0].removeprefix("--- sample 1\n") == samples[1]
    assert "weights: bfloat16 (" in greedy.stderr  # the precision it runs in is said (the default here)
    assert "weights: int8 (" in run("sample", "--out_dir", out, "--max_new_tokens", 2, "--dtype", "int8").stderr


def test_resume_from_the_cli(trained, tmp_path):
    folder, out, _ = trained
    proc = run("train", "--data", folder / "play.txt", "--out_dir", out, "--max_iters", 5, "--eval_interval", 2,
               "--resume", *TINY)
    assert "resuming from" in proc.stdout and "step 3" in proc.stdout and "step     5" in proc.stdout


def test_the_model_line_names_an_unchanged_preset(text_file, tmp_path):
    proc = run("train", "--data", text_file, "--out_dir", tmp_path, "--max_iters", 1, "--batch_size", 2,
               "--eval_iters", 1, "--device", "cpu")
    assert "parameters (small, 4 layers, 256 wide, context 256)" in proc.stdout


def test_resume_takes_data_and_batch_size_from_the_checkpoint(trained, tmp_path):
    folder, _, first = trained
    out = tmp_path / "out"
    run("train", "--data", folder / "play.txt", "--out_dir", out, "--max_iters", 2, "--eval_interval", 5, *TINY)
    proc = run("train", "--out_dir", out, "--max_iters", 3, "--resume", "--device", "cpu")
    assert proc.stdout.count("--resume with changes: max_iters 2 -> 3") == 1
    tokens = first.stdout.split(" tokens: ")[0].rsplit("| ", 1)[1]  # the corpus size of the first run
    assert f"| {tokens} tokens: " in proc.stdout
    state = torch.load(out / "ckpt-00000003.pt", weights_only=True)
    assert state["train_config"]["batch_size"] == 4 and state["tokens_seen"] == 3 * 4 * 32


def test_val_fraction_0_trains_without_val_numbers_and_eval_asks_for_data(trained, tmp_path):
    folder, _, _ = trained
    proc = run("train", "--data", folder / "play.txt", "--out_dir", tmp_path, "--max_iters", 3, "--eval_interval", 2,
               "--val_fraction", 0, *TINY)
    assert "val loss" not in proc.stdout and "no validation split" in proc.stdout and "best train loss" in proc.stdout
    proc = run("eval", "--out_dir", tmp_path, check=False)
    assert proc.returncode == 2 and "--val_fraction 0" in proc.stderr and "--data" in proc.stderr
    assert run("eval", "--out_dir", tmp_path, "--data", folder / "play.txt").stdout.startswith("loss ")


def test_closed_pipe_ends_quietly(trained):
    _, out, _ = trained
    script = (f"{sys.executable} {GPT} sample --out_dir {out} --prompt 'a\nb\nc\nd\n' --max_new_tokens 3000 "
              "--no_stop_at_eot --seed 1 | head -3; exit ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()  # the seed, and the lines saying which precision and kernels run
    assert proc.returncode == 0 and proc.stdout == "a\nb\nc\n" and lines[0] == "(seed 1)", proc.stderr
    assert all(line.startswith(("weights: ", "kernels: ")) for line in lines[1:]), proc.stderr


def test_seed_line_comes_first_and_not_for_greedy(trained):
    _, out, _ = trained
    proc = subprocess.run([sys.executable, GPT, "sample", "--out_dir", out, "--max_new_tokens", "5", "--seed", "7"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    # (the kernels line, where the check runs, comes before the weights line: that line names the products' paths)
    assert re.match(r"\(seed 7\)\n(kernels: [^\n]+\n)?weights: bfloat16 \(--dtype: float32, bfloat16, int8\); products: [^\n]+\nROMEO:\n",
                    proc.stdout), proc.stdout
    assert "seed" not in run("sample", "--out_dir", out, "--max_new_tokens", 5, "--temperature", 0).stderr


def test_ctrl_c_while_sampling_still_prints_the_seed(trained):
    _, out, _ = trained
    proc = subprocess.Popen([sys.executable, GPT, "sample", "--out_dir", out, "--max_new_tokens", "100000",
                             "--no_stop_at_eot", "--seed", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(20)  # tokens are coming
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"(seed 5)" in stderr


@pytest.mark.parametrize("stream", [True, False])
def test_ctrl_c_is_not_lost_to_code_that_clears_errors(trained, monkeypatch, capsys, stream):
    # C code that clears any pending error (PyErr_Clear after a failed lookup) would swallow a
    # KeyboardInterrupt raised while it runs; sample's handler only sets a flag, acted on between tokens
    import gpt
    _, out, _ = trained
    real, calls = gpt.sample_next_token, []

    def clears_errors_on_the_third_token(*args):
        calls.append(1)
        if len(calls) == 3:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(10_000))  # the handler runs here
            except KeyboardInterrupt:
                pass
        return real(*args)

    monkeypatch.setattr(gpt, "sample_next_token", clears_errors_on_the_third_token)
    more = [] if stream else ["--num_samples", "2"]
    with pytest.raises(SystemExit) as exit_:
        gpt.main(["sample", "--out_dir", str(out), "--max_new_tokens", "200", "--seed", "5", *more])
    assert exit_.value.code == 130 and len(calls) == 3 and "gpt: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_several_samples_draw_from_one_seed_each(trained):
    # decoded together, sample i draws from seed + i (rows' numbers may differ from a lone row's in the
    # last bits, so only the draws are compared exactly: tests/test_generate.py)
    _, out, _ = trained
    args = ["sample", "--out_dir", out, "--max_new_tokens", 20, "--seed", 7, "--no_stream", "--num_samples", 3]
    three = run(*args).stdout
    texts = [sample.split("\n", 1)[1] for sample in three.split("--- sample ")[1:]]
    assert run(*args).stdout == three and len(texts) == 3 and len(set(texts)) == 3


def test_compile_prints_no_warning_about_our_own_graph_break(text_file, tmp_path):
    proc = run("train", "--data", text_file, "--out_dir", tmp_path, "--max_iters", 2, "--compile", *TINY)
    assert "Graph break" not in proc.stderr and "done: 2 steps" in proc.stdout, proc.stderr


BAD = [  # (arguments, what the one-line error must mention)
    (["train", "--batch_size", "0"], "--batch_size must be a positive"),
    (["train", "--max_iters", "-3"], "--max_iters must be a positive"),
    (["train", "--n_embd", "30", "--n_head", "4"], "not divisible by n_head"),
    (["train", "--val_fraction", "1.5"], "--val_fraction"),
    (["train", "--dtype", "int8"], "--dtype"),
    (["train", "--preset", "huge"], "unknown preset"),
    (["train", "--data", "{tmp}/missing.txt"], "does not exist"),
    (["train", "--data", "{tmp}/empty.txt"], "is empty"),
    (["train", "--data", "{tmp}/latin1.txt"], "not UTF-8"),
    (["train", "--data", "{tmp}/short.txt"], "needs at least"),
    (["train", "--data", "{tmp}/no_text"], "no .txt files"),
    (["train", "--device", "cuda:0"] if not torch.cuda.is_available() else ["train", "--device", "tpu"], "device"),
    (["train", "--resume", "--out_dir", "{tmp}/nothing"], "no readable checkpoint"),
    (["sample", "--top_k", "0"], "top_k must be >= 1"),
    (["sample", "--temperature", "-1"], "temperature must be"),
    (["sample", "--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["sample", "--max_new_tokens", "-5"], "--max_new_tokens must be >= 0"),
    (["sample", "--out_dir", "{tmp}/nothing"], "no checkpoint in"),
    (["sample", "--checkpoint", "{tmp}/truncated.pt"], "not a readable gpt checkpoint"),
    (["sample", "--init_from", "{tmp}/empty.txt"], "cannot read weights"),
    (["sample", "--top_k", "many"], "invalid int value"),
    (["train", "--init_from", "{tmp}/hf", "--block_size", "128"], "larger than the model's 64"),
    (["sample", "--init_from", "{tmp}/not_gpt2.safetensors"], "not a GPT-2 checkpoint"),
    (["eval", "--batch_size", "0"], "--batch_size"),
    (["frobnicate"], "invalid choice"),
    (["frobnicate"], "(see `python gpt.py --help`)"),
    (["sample", "--top_k", "many"], "(see `python gpt.py sample --help`)"),
    (["train", "--out_dir", "{out}", "--data", "{out}/../play.txt"], "holds another run"),
    (["train", "--resume", "--overwrite"], "pass one"),
    (["train", "--resume", "--out_dir", "{out}", "--n_layer", "4"], "--n_layer 4 differs from the run being resumed"),
    (["train", "--resume", "--out_dir", "{out}", "--batch_size", "8"], "--batch_size 8 differs"),
    (["train", "--resume", "--out_dir", "{out}", "--data", "{tmp}/short.txt"], "differs from the run being resumed"),
    (["train", "--init_from", "{tmp}/hf", "--n_layer", "2"], "cannot change a model loaded with --init_from"),
    (["sample", "--prompt", "hi", "--prompt_file", "{tmp}/short.txt"], "--prompt and --prompt_file"),
    (["eval", "--out_dir", "{out}", "--data", "{tmp}/short.txt"], "too few for one window"),
] + ([(["train", "--tensorboard", "--data", "{out}/../play.txt", "--out_dir", "{tmp}/tb", "--max_iters", "1"],
       "pip install tensorboard")] if importlib.util.find_spec("tensorboard") is None else [])


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_line(args, message, tmp_path, trained):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "short.txt").write_text("Too short to train on.")
    (tmp_path / "no_text").mkdir()
    good = trained[1] / "best.pt"
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    if "{tmp}/hf" in args:
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path / "hf")
    if "{tmp}/not_gpt2.safetensors" in args:
        from safetensors.torch import save_file

        save_file({"encoder.weight": torch.zeros(3, 3)}, str(tmp_path / "not_gpt2.safetensors"))
    proc = run(*[a.format(tmp=tmp_path, out=trained[1]) for a in args], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "lower --block_size" not in proc.stderr or args[0] == "train"  # a flag only train has
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_flag_has_a_help_line_and_help_shows_its_default(monkeypatch, capsys):
    """Walks the parser: each subcommand and each of its flags (the shared ones too) has a help line, and
    `--help` shows it with the default where there is one (train's flags: the TrainConfig field's)."""
    import argparse
    import dataclasses

    import gpt

    monkeypatch.setenv("COLUMNS", "100")
    parser = gpt.build_parser()
    commands, = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert {a.dest: bool(a.help) for a in commands._choices_actions} == dict.fromkeys(commands.choices, True)
    config = {f.name: f.default for f in dataclasses.fields(gpt.TrainConfig)}
    for name, sub in commands.choices.items():
        with pytest.raises(SystemExit):
            sub.parse_args(["--help"])
        shown = " ".join(capsys.readouterr().out.split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = action.help.partition("default")[0].strip(" (") if action.help else ""  # more than a default
            assert what, f"{name} {action.option_strings or action.dest} has no help line"
            formatter = sub.formatter_class(prog=sub.prog)
            formatter.add_argument(action)
            line = " ".join(formatter.format_help().split())  # the flag's entry in --help
            assert line in shown, (name, line)
            default = config.get(action.dest) if name == "train" else action.default
            if name == "train" and action.dest in {f.name for f in dataclasses.fields(gpt.GPTConfig)}:
                default = "from --preset"
            if default is not None and default is not False:  # (None and a switch's False: the help says)
                assert repr(default).strip("'") in line.partition("default")[2], (name, line)
