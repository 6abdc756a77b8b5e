"""Label Studio's formats: the labeling config, the import file and the CSV darkroom writes, and
the exports (JSON, JSON_MIN, CSV, as Label Studio 1.23.2 wrote them) and plain CSV it reads."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET

import pytest

from darkroom.monitoring import labelstudio
from darkroom.monitoring.labelstudio import ExportError, QueuedImage, read_answers
from tests.labeling_helpers import CLASSES, check_import_file, fixture

QUEUE = [
    QueuedImage("incoming/a.png", "s3://b/r/incoming/a.png", "cat", 0.41, "uncertain (margin 0.9)"),
    QueuedImage("incoming/b.png", "https://x/b.png?X-Amz-Signature=1", "fox", 0.97, "random"),
]


def test_the_import_file_follows_the_format_of_the_labeling_config():
    config = labelstudio.labeling_config(CLASSES)
    tasks = labelstudio.tasks(QUEUE, "v1")
    check_import_file(tasks, config)
    assert [t["data"]["key"] for t in tasks] == ["incoming/a.png", "incoming/b.png"]
    assert [t["data"]["image"] for t in tasks] == [q.url for q in QUEUE]
    assert tasks[0]["predictions"][0] == {
        "model_version": "v1",
        "score": 0.41,
        "result": [labelstudio.choice("cat")],
    }
    # The fixture's predictions (Label Studio's own) pass the same check with a config like ours.
    exported = json.loads(fixture("export.json"))
    check_import_file(
        [{"data": t["data"], "predictions": [t["annotations"][0]["prediction"]]} for t in exported],
        config,
    )


def test_class_names_are_escaped_in_the_labeling_config():
    names = ['a"b', "<c>", "d&e", "3"]
    view = ET.fromstring(labelstudio.labeling_config(names))
    assert [c.get("value") for c in view.iter("Choice")] == names


def test_the_table_lists_the_queue():
    rows = list(csv.DictReader(io.StringIO(labelstudio.table(QUEUE))))
    assert list(rows[0]) == labelstudio.CSV_COLUMNS
    assert [(r["key"], r["url"], r["predicted_label"], r["why"]) for r in rows] == [
        (q.key, q.url, q.label, q.why) for q in QUEUE
    ]
    assert float(rows[1]["confidence"]) == pytest.approx(0.97)


def _by_image(answers) -> dict[str, tuple[list[str], int]]:
    return {a.image.rsplit("/", 1)[1]: (sorted(a.labels), a.cancelled) for a in answers}


def test_the_json_export_gives_each_task_its_answers():
    got = _by_image(read_answers(fixture("export.json"), "export.json"))
    # a: dog; b: skipped (cancelled, no label); c: cat and fox (a disagreement); d: absent.
    assert got == {"a.jpg": (["dog"], 0), "b.jpg": ([], 1), "c.jpg": (["cat", "fox"], 0)}


@pytest.mark.parametrize("name", ["export-min.json", "export.csv"])
def test_the_min_and_csv_exports_give_the_same_answers(name):
    got = _by_image(read_answers(fixture(name), name))
    assert got == {"a.jpg": (["dog"], 0), "c.jpg": (["cat", "fox"], 0)}  # b and d: absent


def test_a_plain_key_label_csv_and_several_choices_in_one_cell():
    text = 'key,label\nincoming/x.png,dog\nincoming/y.png,"{""choices"": [""cat"", ""fox""]}"\n'
    answers = read_answers(text.encode(), "labels.csv")
    assert [(a.key, a.labels) for a in answers] == [
        ("incoming/x.png", ["dog"]),
        ("incoming/y.png", ["cat", "fox"]),
    ]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"file,class\nx.png,dog\n", "key,label"),
        (b"[1, 2]", "list of tasks"),
        (b'[{"data": {"image": "x"}, "annotations": [', "not valid JSON"),
    ],
)
def test_a_file_that_is_no_export_is_refused_saying_what_is_expected(data, needle):
    with pytest.raises(ExportError, match=needle):
        read_answers(data, "f")


def test_a_cancelled_annotation_is_no_answer_even_with_a_choice_in_it():
    says = {
        "type": "choices",
        "from_name": "label",
        "to_name": "image",
        "value": {"choices": ["cat"]},
    }
    task = {
        "data": {"image": "s3://b/incoming/x.png", "key": "incoming/x.png"},
        "annotations": [
            {"result": [says], "was_cancelled": True},
            {"result": [{**says, "value": {"choices": ["dog"]}}], "was_cancelled": False},
        ],
    }
    (answer,) = read_answers(json.dumps([task]).encode(), "export.json")
    assert (answer.labels, answer.cancelled) == (["dog"], 1)
