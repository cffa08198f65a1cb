"""The README's Python examples run as written."""

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    text, out, i = README.read_text(), [], 0
    while (i := text.find("```python\n", i)) >= 0:
        start = i + len("```python\n")
        end = text.index("```", start)
        out.append(text[start:end])
        i = end
    return out


def test_readme_module_example_trains_a_step(capsys):
    exec(compile(_blocks()[0], "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    loss, shape, frozen = lines[0].split(" ", 2)[0], lines[0].split(" ", 1)[1], lines[0]
    assert 0 < float(loss) < 10
    assert "(16, 16, 3, 3)" in shape and frozen.endswith("None")  # frozen stem: no gradient
    assert lines[1] == "['stem.0.weight', 'stem.0.bias', 'block.conv1.weight']"


def test_readme_kernel_example_runs(capsys):
    exec(compile(_blocks()[1], "README.md", "exec"), {})
    err = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert err < 1e-4  # float32 kernel vs the float64 oracle
