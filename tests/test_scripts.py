"""The commit script's arguments, built without a server, against the contract atop
workers/lua/commit.lua; and every script file opens with its KEYS/ARGV contract."""

from __future__ import annotations

from importlib import resources

import msgspec

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


OUTBOX_HEAD = CommitHead(stats_key="af:{m1}:stats", delayed_key="af:{m1}:delayed",
                         dead_stream="af:{m1}:dead", queued_key="af:{m1}:queued", group="g",
                         consumer="me", reply_maxlen=80, dead_maxlen=90,
                         outbox_key="af:{m1}:outbox")


def test_follow_ups_for_another_model_go_through_the_outbox_and_name_no_key_of_its_slot():
    here = FollowUpWrite("af:{m1}:tasks", b"T1", b"E1", "af:{m1}:tenants:i", "af:{m1}:queued",
                         "acme")
    away = FollowUpWrite("af:{m2}:tasks:acme", b"T2", b"E2", "af:{m2}:tenants:i",
                         "af:{m2}:queued", "acme")
    keys, args = commit_args(OUTBOX_HEAD, [_rec(b"3-0", source="af:{m1}:tasks",
                                                result_key="af:{m1}:result:x",
                                                followups=[away, here])])
    # Every key is the parent model's: one slot, one node of a cluster.
    assert {k.split("}")[0] for k in keys} == {"af:{m1"}
    assert keys[-4:] == ["af:{m1}:tasks", "af:{m1}:tenants:i", "af:{m1}:queued",
                         "af:{m1}:outbox"]
    at = args.index(b"3-0")
    assert args[at + 1] == "rS---O-"
    # n local follow-ups (payload, event, tenant), then o outbox ones with their keys as ARGV
    assert args[at + 8:] == [1, b"T1", b"E1", "acme",
                             1, b"T2", b"E2", "acme", "af:{m2}:tasks:acme",
                             "af:{m2}:tenants:i", "af:{m2}:queued"]


def test_without_an_outbox_or_with_same_model_follow_ups_the_layout_is_unchanged():
    here = FollowUpWrite("af:{m1}:tasks", b"T1", b"", "af:{m1}:tenants:i", "af:{m1}:queued",
                         "acme")
    rec = _rec(b"1-0", source="af:{m1}:tasks", followups=[here])
    assert commit_args(OUTBOX_HEAD, [rec])[1][-4:] == [1, b"T1", b"", "acme"]
    plain = msgspec.structs.replace(OUTBOX_HEAD, outbox_key="")
    away = FollowUpWrite("af:{m2}:tasks", b"T2", b"", "af:{m2}:tenants:i", "af:{m2}:queued",
                         "acme")
    keys, args = commit_args(plain, [_rec(b"1-0", source="af:{m1}:tasks", followups=[away])])
    assert args[args.index(b"1-0") + 1] == "rS---F-" and "af:{m2}:tasks" in keys


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


def test_joins_in_another_slot_go_through_the_outbox_with_their_keys_as_arguments():
    step = dict(stream="af:{m2}:tasks:acme", lanes_key="af:{m2}:tenants:i",
                queued_key="af:{m2}:queued", tenant="acme")
    # a child on m1 whose join is kept on m2: its place, through m1's outbox
    away = JoinWrite(state_key="af:{m2}:join:p", event=b"JE", member="p.1",
                     trace_key="af:{m2}:trace:c", **step)
    keys, args = commit_args(OUTBOX_HEAD, [_rec(b"1-0", source="af:{m1}:tasks",
                                                result_key="af:{m1}:result:x", join=away)])
    assert {k.split("}")[0] for k in keys} == {"af:{m1"} and keys[-1] == "af:{m1}:outbox"
    at = args.index(b"1-0")
    assert args[at + 1] == "rS----A"
    assert args[at + 8:] == ["acme", b"JE", "p.1", "af:{m2}:join:p", "af:{m2}:tasks:acme",
                             "af:{m2}:tenants:i", "af:{m2}:queued", "af:{m2}:trace:c"]
    # a parent on m1 opening a join whose step is for m2: the state here, the step's lane
    # through the outbox; the same for a child on m1 whose join (on m1) fires a step for m2
    opening = JoinWrite(state_key="af:{m1}:join:p", payload=b"STEP", children=("p.1",),
                        **step)
    member = JoinWrite(state_key="af:{m1}:join:p", member="p.1", **step)
    for join, flag, tail in ((opening, "K", [b"STEP", 1, "p.1"]), (member, "N", ["p.1"])):
        keys, args = commit_args(OUTBOX_HEAD, [_rec(b"2-0", source="af:{m1}:tasks",
                                                    result_key="af:{m1}:result:y", join=join)])
        assert keys[-2:] == ["af:{m1}:join:p", "af:{m1}:outbox"]
        at = args.index(b"2-0")
        assert args[at + 1] == "rS----" + flag
        assert args[at + 8:] == ["acme", b"", *tail, "af:{m2}:tasks:acme",
                                 "af:{m2}:tenants:i", "af:{m2}:queued"]
