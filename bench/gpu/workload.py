"""Deterministic synthetic prompts, sized in tokens with the model's own tokenizer.

Every path of a benchmark run gets the same prompt texts: offline `LLM.generate`, `vllm serve`
and the fleet each tokenise them themselves, as they would in production.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgspec

# A fixed vocabulary: common words, each one or two tokens for SmolLM2's tokenizer.
WORDS = tuple("""
able about above across act add after again against age agent ago agree air all allow also
always among amount and animal answer any appear apply area argue arm around art ask attack
away back bad bag ball bank base beat become before begin behind believe best better between
big bill bit black blood blue board body book born both box boy break bring brother build
business buy call camera campaign can car card care carry case catch cause cell center chair
chance change charge check child choice choose church city claim class clear close coach cold
college color come common company compare computer concern control cost could country course
court cover create crime cup current cut dark data daughter day dead deal death debate decade
decide deep defense degree design detail develop die different dinner direction discover
discuss disease doctor dog door down draw dream drive drop drug during early east easy eat
edge effect effort eight either else end energy enjoy enough enter entire environment error
even evening event ever every evidence exactly example expect expert explain eye face fact
factor fail fall family far fast father fear federal feel field fight figure fill film final
find fine finger finish fire firm first fish five floor fly focus follow food foot force
forget form forward four free friend front full fund future game garden gas general get girl
give glass goal good great green ground group grow guess gun guy hair half hand happen happy
hard have head health hear heart heat heavy help here high history hit hold home hope hospital
hot hotel hour house huge human idea image impact improve include increase indeed industry
inside instead interest interview into issue item job join just keep key kid kind kitchen
know land language large last late later laugh law lawyer lay lead learn least leave left leg
legal less letter level lie life light like likely line list listen little live local long
look lose loss lot love low machine magazine main maintain major make manage many market
matter may maybe mean measure media medical meet member memory mention message method middle
might military million mind minute miss mission model modern moment money month more morning
most mother mouth move movie much music must name nation natural near need network never new
news next nice night none north note nothing notice now number occur offer office officer
often oil old once only open operation option order other outside over own owner page pain
paper parent part party pass past patient pattern pay peace people perform perhaps period
person phone physical pick picture piece place plan plant play player point police policy
poor popular position power practice prepare present pressure pretty prevent price private
probably problem process produce product program project protect prove provide public pull
push put quality question quick quite race radio raise range rate rather reach read ready
real reason receive recent record red reduce region remain remember report require research
resource respond rest result return reveal rich right rise risk road rock role room rule run
safe same save say scene school science score sea season seat second section security see
seek seem sell send senior sense series serve service set seven several shake share shoot
short shot should show side sign similar simple since sing single sister sit site size skill
small smile social society soldier some son song soon sort sound source south space speak
special speech spend sport spring staff stage stand standard star start state station stay
step still stock stop store story strategy street strong student study stuff style subject
success suffer suggest summer support sure surface system table take talk task teach team
tell ten term test thank theory thing think third thought three through throw time today
together tonight too top total tough toward town trade travel treat tree trial trip trouble
true truth try turn type under unit until upon use usually value various very victim view
visit voice vote wait walk wall want war watch water way weapon wear week weight well west
what when where whether which while white whole why wide wife will win wind window wish with
within without woman wonder word work worker world worry would write writer wrong yard yeah
year yes yet young your yourself
""".split())


class PromptSet(msgspec.Struct, kw_only=True):
    """The prompts of one workload and their token counts (by the model's tokenizer)."""

    name: str
    prompts: list[str]
    prompt_tokens: list[int]
    max_tokens: int
    shared_prefix_tokens: int = 0


class Tokens:
    """Counts tokens the way the engines do (no special tokens: SmolLM2 adds none)."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # A byte-level BPE splits text into words with their leading space before merging, so
        # a text of such words costs the sum of what each " word" costs on its own.
        self.word_tokens = {w: self.count(" " + w) for w in WORDS}

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def words_to_tokens(tokens: Tokens, rng: random.Random, head: str, target_tokens: int) -> str:
    """`head` followed by random words, until it is at least `target_tokens` long."""
    words: list[str] = []
    have = tokens.count(head)
    while have < target_tokens:
        word = rng.choice(WORDS)
        words.append(word)
        have += tokens.word_tokens[word]
    return head + "".join(" " + w for w in words)


def bulk_prompts(tokens: Tokens, *, name: str, count: int, prompt_tokens: int, max_tokens: int,
                 seed: int, system: str = "") -> PromptSet:
    """`count` distinct prompts of about `prompt_tokens` tokens after an optional shared
    `system` prefix (the agents' system prompt)."""
    rng = random.Random(seed)
    own = [words_to_tokens(tokens, rng, f"Request {seed}-{i}:", prompt_tokens)
           for i in range(count)]
    prompts = [system + text for text in own]
    counts = tokens.count_many(own)
    if system:  # the shared part costs the same in every prompt: count it on a sample
        sample = min(count, 32)
        offset = tokens.count_many(prompts[:sample])
        shift = {full - part for full, part in zip(offset, counts)}
        if len(shift) == 1:
            extra = shift.pop()
            counts = [n + extra for n in counts]
        else:
            counts = tokens.count_many(prompts)
    return PromptSet(name=name, prompts=prompts, prompt_tokens=counts, max_tokens=max_tokens,
                     shared_prefix_tokens=tokens.count(system) if system else 0)


def system_prompt(tokens: Tokens, *, target_tokens: int, seed: int) -> str:
    """A long agent system prompt shared by every task of the prefix workload."""
    rng = random.Random(seed)
    body = words_to_tokens(tokens, rng, "You are a careful agent. Follow these rules:",
                           target_tokens)
    return body + "\n\nTask: "
