"""The commit script's arguments, built without a server, against the contract atop
workers/lua/commit.lua; and every script file opens with its KEYS/ARGV contract."""

from __future__ import annotations

from importlib import resources

from agentfleet.workers.scripts import (
    CommitHead,
    CommitRecord,
    FollowUpWrite,
    JoinWrite,
    commit_args,
    reply_entry,
)

HEAD = CommitHead(stats_key="st", delayed_key="dl", dead_stream="dd", queued_key="qu", group="g",
                  consumer="me", reply_maxlen=80, dead_maxlen=90)


def _rec(entry_id: bytes, **kw) -> CommitRecord:
    base = dict(source="s1", entry_id=entry_id, outcome=b"r", v1=b"R" + entry_id, v2=b"",
                result_key=f"res:{entry_id.decode()}", reply_key="", trace_key="", trace=b"",
                followups=(), tenant="acme", result_ttl_s=60, trace_ttl_s=70)
    return CommitRecord(**{**base, **kw})


def test_a_lone_result_costs_one_key_and_three_arguments_besides_its_source():
    keys, args = commit_args(HEAD, [_rec(b"5-0")])
    assert keys == ["st", "dl", "dd", "qu", "s1", "res:5-0"]
    # the source: its id range, then its tenant and that tenant's retention
    assert args == ["g", "me", 80, 90, 0, b"5-0", "rS-----", b"R5-0",
                    b"5-0", b"5-0", "acme", 60, 70]


def test_records_are_grouped_by_source_and_reply_stream_each_named_once():
    recs = [_rec(b"3-0", reply_key="rpA"), _rec(b"1-0", reply_key="rpB"),
            _rec(b"2-0", reply_key="rpA"), _rec(b"9-1", source="s2", reply_key="rpA")]
    keys, args = commit_args(HEAD, recs)
    assert keys.count("s1") == 1 and keys.count("s2") == 1
    # s1's group: its lowest and highest entry ids bound the ownership check
    first = args.index(b"3-0")
    assert args[first + 1] == "rSP----" and args[first + 3:first + 5] == [b"1-0", b"3-0"]
    assert args[args.index(b"2-0") + 1] == "r-p----"  # same reply stream as the record before
    assert args[4] == 2  # m: two reply payloads built, their streams last in KEYS
    assert keys[-2:] == ["rpA", "rpB"]
    assert args[-4:] == [3, reply_entry([b"R3-0", b"R2-0", b"R9-1"]), 1, reply_entry([b"R1-0"])]


def test_retries_dead_letters_traces_bulk_jobs_and_followups_carry_their_flags():
    recs = [
        _rec(b"1-0", outcome=b"y", v1=b"itask", v2="12.5", result_key="s1"),
        _rec(b"2-0", outcome=b"d", v2=b"DEAD", trace_key="tr", trace=b"EV"),
        _rec(b"3-0", batch_out="bo", batch_counts="bc", batch_status="succeeded",
             followups=[FollowUpWrite("f1", b"T1", b"E1", "z1", "q1", "acme"),
                        FollowUpWrite("f2", b"T2", b"", "z2", "q2", "acme")]),
    ]
    keys, args = commit_args(HEAD, recs)
    assert keys == ["st", "dl", "dd", "qu", "s1", "res:2-0", "tr", "res:3-0", "bo", "bc",
                    "f1", "z1", "q1", "f2", "z2", "q2"]
    assert args[5:] == [
        b"1-0", "yS-----", b"itask", "12.5", b"1-0", b"3-0", "acme", 60, 70,  # retry: v2 = due
        b"2-0", "d--T---", b"R2-0", b"DEAD", b"EV",
        b"3-0", "r---BF-", b"R3-0", "succeeded", 2, b"T1", b"E1", "acme", b"T2", b"", "acme"]


def test_every_script_file_opens_with_its_contract():
    for package in ("agentfleet.workers", "agentfleet.producer"):
        for f in resources.files(package).joinpath("lua").iterdir():
            text = f.read_text()
            head = text.split("\n\n")[0] + text[:2000]
            assert text.startswith(f"-- {f.name}:"), f.name
            assert "-- KEYS:" in head and "-- ARGV:" in head, f.name


def test_a_join_opened_by_its_parent_and_joined_by_a_child_takes_its_four_keys_last():
    opening = JoinWrite(state_key="js", stream="jq", lanes_key="jl", queued_key="jc",
                        tenant="acme", event=b"JE", payload=b"JOIN", children=("p.1", "p.2"))
    member = JoinWrite(state_key="js", stream="jq", lanes_key="jl", queued_key="jc",
                       tenant="acme", event=b"", member="p.1")
    recs = [_rec(b"1-0", followups=[FollowUpWrite("f1", b"T1", b"E1", "z1", "q1", "acme")],
                 join=opening),
            _rec(b"2-0", join=member)]
    keys, args = commit_args(HEAD, recs)
    assert keys[4:] == ["s1", "res:1-0", "f1", "z1", "q1", "js", "jq", "jl", "jc",
                        "res:2-0", "js", "jq", "jl", "jc"]
    assert args[5:] == [
        b"1-0", "rS---FJ", b"R1-0", b"1-0", b"2-0", "acme", 60, 70,
        1, b"T1", b"E1", "acme",  # the follow-ups first, then the join: tenant, event, ...
        "acme", b"JE", b"JOIN", 2, "p.1", "p.2",  # ... the step and the children it waits for
        b"2-0", "r-----M", b"R2-0", "acme", b"", "p.1"]  # a child: its own id
