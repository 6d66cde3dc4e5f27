import sqlite3
import threading

from station.records import ItemRecord, Records


def rec(track_id: int, command_id: int | None = None, outcome: str = "sent") -> ItemRecord:
    return ItemRecord(track_id=track_id, first_seen_s=1.0, decided_s=2.0, class_name="alkaline", confidence=0.9,
                      votes={"alkaline": 8.1}, views=9, bin=2, diverter_id=2, reason="rule", command_id=command_id,
                      fire_count=1234, outcome=outcome, model_version="m1", u_mm=-10.0, y_mm=100.0,
                      length_mm=50.0, width_mm=14.0)


def test_items_and_outcomes_are_durable(tmp_path):
    path = tmp_path / "r.sqlite"
    r = Records(path)
    run = r.start_run("sim-fast", "m1", {"a": 1})
    for i in range(50):
        r.item_decided(rec(i, command_id=i + 100))
    r.item_outcome(105, "fired", 3.0, fired_count=1230)
    r.item_outcome(106, "nak:LATE", 3.1)
    r.end_run({"decided": 50})
    r.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM items WHERE run_id=?", (run,)).fetchone()[0] == 50
    assert db.execute("SELECT outcome, fired_count FROM items WHERE command_id=105").fetchone() == ("fired", 1230)
    assert db.execute("SELECT outcome FROM items WHERE command_id=106").fetchone() == ("nak:LATE",)
    assert db.execute("SELECT summary_json FROM runs WHERE id=?", (run,)).fetchone()[0] == '{"decided": 50}'


def test_flush_sees_everything_written_from_other_threads(tmp_path):
    r = Records(tmp_path / "r.sqlite", batch_s=0.05)
    r.start_run("sim-fast", "m1", {})
    ts = [threading.Thread(target=lambda k=k: [r.item_decided(rec(k * 100 + i)) for i in range(100)]) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(r.items()) == 400
    r.close()


def test_a_bad_row_loses_only_itself(tmp_path):
    r = Records(tmp_path / "r.sqlite", batch_s=0.2)
    r.start_run("sim-fast", "m1", {})
    r.item_decided(rec(1))
    r.item_decided(rec(1))          # the same item twice in one run: refused by the schema
    r.item_decided(rec(2))
    r.flush()
    assert [i["track_id"] for i in r.items()] == [1, 2]
    assert r.failed_rows == 1
    r.close()
