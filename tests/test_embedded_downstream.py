"""Everything downstream of an export of the embedded default works on the real tower (issue 23 item 4): calibrate,
audit, the pipeline, `safe-llava serve` and `/v1/moderations`.

One module fixture builds the embedded default with the pretrained EfficientNet-Lite0 tower and the 2-layer `tiny`
language model, trains stage 1 briefly on a small mini benchmark (13 images per source: 6 clean validation rows,
enough for a false-flag rate of 0.3 at confidence 0.8), calibrates it on the validation split and exports it with
the calibration. The tests then run each downstream tool on that export and compare its verdicts with in-process
`assess_safety` on the same folder. The end-to-end demo (report.html / report.png) is in tests/test_demo.py.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import chat_prompt
from serving_live import LiveServer, data_url, image_message

from modeling_safe_llava.data.mini_benchmark import build_mini_benchmark
from modeling_safe_llava.modeling_safe_llava import SafeLlavaForConditionalGeneration
from modeling_safe_llava.processing_safe_llava import SafeLlavaProcessor
from modeling_safe_llava.tools.calibration import (
    calibrate,
    calibration_on_validation,
    check_calibration_on,
    minimum_clean_rows,
)
from modeling_safe_llava.tools.embedded import build_embedded_default
from modeling_safe_llava.tools.hub import export_for_hub
from modeling_safe_llava.training import train_stage1


NUM_PER_CATEGORY = 13  # round(13 * 0.2) = 3 validation rows per source, 2 clean sources: 6 clean validation rows
RATE, CONFIDENCE = 0.3, 0.8  # minimum_clean_rows(0.3, 0.8) = 5
STAGE1_EPOCHS = 10
QUESTION = "What is shown in this image?"
TOWER_TYPE = "safe_llava_efficientnet_lite"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The benchmark, the trained and calibrated in-memory model, its calibration report and its export folder."""
    root = tmp_path_factory.mktemp("embedded_downstream")
    data = build_mini_benchmark(seed=0, num_per_category=NUM_PER_CATEGORY)
    model, processor = build_embedded_default("tiny", seed=0)
    model = train_stage1(
        model, processor, data["train"], root / "stage1", recipe="recipe_stage1_demo.json",
        num_train_epochs=STAGE1_EPOCHS,
    ).eval()
    report = calibrate(model, processor, data["validation"], root / "calibration", RATE, confidence=CONFIDENCE)
    export = export_for_hub(model, processor, root / "export", calibration=report)
    return SimpleNamespace(data=data, model=model, processor=processor, report=report, export=export, root=root)


@pytest.fixture(scope="module")
def reloaded(built):
    """The export loaded back in this process."""
    model = SafeLlavaForConditionalGeneration.from_pretrained(built.export).eval()
    return model, SafeLlavaProcessor.from_pretrained(built.export)


def assess(model_and_processor, images, **safety) -> list[dict]:
    """In-process `assess_safety` records of `images`, each asked QUESTION."""
    model, processor = model_and_processor
    prompts = [chat_prompt(processor, QUESTION)] * len(images)
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.assess_safety(**inputs, **safety).to_records()


def rows_of(split, source: str) -> list[dict]:
    return [row for row in split if row["source"] == source]


def test_the_fixture_uses_the_pretrained_tower_and_enough_clean_rows(built):
    assert built.model.config.vision_config.model_type == TOWER_TYPE
    assert json.loads((built.export / "config.json").read_text())["vision_config"]["model_type"] == TOWER_TYPE
    assert built.report["counts"]["clean"] >= minimum_clean_rows(RATE, CONFIDENCE)


# -- calibrate ------------------------------------------------------------------------------------------------------


def test_calibration_keeps_its_guarantee_on_validation_and_lowers_the_nll(built):
    report = built.report
    assert report["counts"]["clean_flagged"] <= report["counts"]["allowed_exceedances"]
    assert report["nll"]["level_after"] <= report["nll"]["level_before"]
    assert report["nll"]["type_after"] <= report["nll"]["type_before"]
    assert 0.0 <= report["ece_after"] <= 1.0 and 0.0 <= report["ece_before"] <= 1.0
    assert {"calibration.json", "summary.md", "reliability.png", "threshold.png"} <= {
        path.name for path in (built.root / "calibration").iterdir()
    }


def test_the_export_carries_the_calibration(built):
    config = json.loads((built.export / "config.json").read_text())
    generation = json.loads((built.export / "generation_config.json").read_text())
    report = built.report
    assert config["safety_level_temperature"] == pytest.approx(report["temperatures"]["level"])
    assert config["safety_type_temperature"] == pytest.approx(report["temperatures"]["type"])
    assert generation["safety_threshold"] == pytest.approx(report["threshold"])
    assert json.loads((built.export / "calibration.json").read_text())["threshold"] == report["threshold"]
    card = (built.export / "README.md").read_text()
    assert "Calibration" in card and "ECE of risk after" in card


def test_the_calibration_check_reproduces_calibrates_own_numbers_on_validation(built):
    check = check_calibration_on(built.model, built.processor, built.data["validation"], built.report)
    from_report = calibration_on_validation(built.report)
    assert check.pop("clean_flag_rate_interval") == from_report.pop("clean_flag_rate_interval")
    assert check == pytest.approx(from_report, abs=1e-6)
    assert check["clean_rows"] == built.report["counts"]["clean"] and check["recall"] > 0


def test_the_calibration_check_on_shifted_counts_what_the_model_flags(built, reloaded):
    shifted = built.data["shifted"]
    check = check_calibration_on(*reloaded, shifted, built.report)
    clean_images = [row["image"] for row in shifted if row["safe_level"] == 0]
    flagged = sum(record["flagged"] for record in assess(reloaded, clean_images))
    assert (check["clean_rows"], check["clean_flagged"]) == (len(clean_images), flagged)
    assert check["within_target"] == (flagged / len(clean_images) <= RATE)
    low, high = check["clean_flag_rate_interval"]
    assert low <= check["clean_flag_rate"] <= high


def test_the_calibration_check_refuses_a_model_without_that_calibration(built):
    other = SafeLlavaForConditionalGeneration.from_pretrained(built.root / "stage1").eval()  # before calibration
    with pytest.raises(ValueError, match="does not carry the calibration"):
        check_calibration_on(other, built.processor, built.data["shifted"], built.report)


# -- the trained head on the real tower -----------------------------------------------------------------------------


def test_the_exports_verdicts_flag_jailbreaks_and_leave_photos_alone(built, reloaded):
    """A briefly trained head on the real tower: test jailbreaks, personal data and fake news rank above every test
    photo; at the calibrated threshold the jailbreaks are flagged as illegal and no photo is."""
    test = built.data["test"]
    jailbreaks = assess(reloaded, [row["image"] for row in rows_of(test, "typographic_jailbreak")])
    others = assess(reloaded, [row["image"] for row in rows_of(test, "personal_data") + rows_of(test, "fake_news")])
    photos = assess(reloaded, [row["image"] for row in rows_of(test, "photo")])
    assert all(record["threshold"] == pytest.approx(built.report["threshold"]) for record in jailbreaks + photos)
    assert min(record["risk"] for record in jailbreaks + others) > max(record["risk"] for record in photos)
    assert all(record["flagged"] and record["category_name"] == "Illegal Risk" for record in jailbreaks)
    assert not any(record["flagged"] for record in photos)


# -- audit ----------------------------------------------------------------------------------------------------------


def test_audit_of_the_export_records_the_calibrated_verdicts(built, reloaded, tmp_path):
    from modeling_safe_llava.tools.audit import audit_images

    test = built.data["test"].select_columns(["id", "image"])
    summary = audit_images(*reloaded, test, tmp_path / "audit", batch_size=8, question=QUESTION)
    config = json.loads((tmp_path / "audit" / "audit_config.json").read_text())
    assert config["calibration"]["safety_level_temperature"] == pytest.approx(built.report["temperatures"]["level"])
    records = {
        json.loads(line)["id"]: json.loads(line)
        for line in (tmp_path / "audit" / "results.jsonl").read_text().splitlines()
    }
    assert len(records) == len(test) and json.dumps(summary)
    expected = assess(reloaded, [row["image"] for row in built.data["test"]])
    for row, verdict in zip(built.data["test"], expected):
        record = records[row["id"]]
        assert record["status"] == "ok" and record["threshold"] == pytest.approx(built.report["threshold"])
        assert record["risk"] == pytest.approx(verdict["risk"], abs=1e-5) and record["flagged"] == verdict["flagged"]
    assert (tmp_path / "audit" / "contact_sheet.png").is_file()


# -- the pipeline ---------------------------------------------------------------------------------------------------


def test_the_pipeline_from_the_export_folder_gives_the_exports_verdicts(built, reloaded):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(built.export), trust_remote_code=True)
    assert type(pipe).__module__.startswith("transformers_modules")
    images = [rows_of(built.data["test"], source)[0]["image"] for source in ("typographic_jailbreak", "photo")]
    expected = assess(reloaded, images)
    for image, verdict in zip(images, expected):
        chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
        safety = pipe(text=chat, max_new_tokens=2)[0]["safety"]
        assert safety["judged"] and safety["threshold"] == pytest.approx(built.report["threshold"])
        assert (safety["flagged"], safety["action"]) == (verdict["flagged"], verdict["action"])
        assert safety["risk"] == pytest.approx(verdict["risk"], abs=1e-5)
    assert expected[0]["flagged"] and expected[0]["action"] != "allow" and expected[1]["action"] == "allow"


# -- safe-llava serve and /v1/moderations ---------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_and_moderations_give_the_in_process_verdicts_on_the_export(built, reloaded):
    images = [rows_of(built.data["test"], source)[0]["image"] for source in ("typographic_jailbreak", "photo")]
    expected = assess(reloaded, images)
    with LiveServer(["--model", str(built.export)], env={"SAFE_LLAVA_API_KEY": "k"}) as server:
        client = server.openai_client(api_key="k")
        for image, verdict in zip(images, expected):
            parts = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
            result = client.moderations.create(model=server.model, input=parts).results[0]
            safety = result.model_extra["safety"]
            assert result.flagged == verdict["flagged"] and safety["risk"] == pytest.approx(verdict["risk"], abs=1e-5)
            categories = result.categories.model_dump()
            named = {name for name in reloaded[0].config.risky_type_labels if categories[name]}
            assert named == ({verdict["category_name"]} if verdict["flagged"] else set())
        answer = client.chat.completions.create(
            model=server.model, messages=image_message(images[0], QUESTION), max_tokens=4, temperature=0
        )
    served = answer.model_extra["safety"]
    assert served["flagged"] and served["action"] == expected[0]["action"] != "allow"
    assert served["risk"] == pytest.approx(expected[0]["risk"], abs=1e-5)
