"""Synthetic instruction tasks whose answers can be checked exactly.

Every task has

* a generator ``fn(rng: random.Random) -> Example`` (see ``GENERATORS`` and the
  module-level functions ``arithmetic``, ``unit_conversion``, ``sort_numbers``,
  ``string_edit``, ``passive_voice``, ``list_stats``, ``temperature_list``);
* a small set of prompt templates (a few phrasings per operation).  Templates
  are also compiled to regular expressions, so the checker can re-derive the
  canonical answer from the prompt text alone;
* a canonical completion format (documented in ``ANSWER_FORMATS`` and in
  ``engine/data/README.md``);
* a list of plausible wrong answers, used as ``rejected`` in the DPO data.

``is_correct(task, prompt, completion_text)`` compares a model completion with
the canonical answer: exact match after stripping surrounding whitespace (for
the multi-line ``temperature_list`` task each line is stripped; for the
free-form ``passive_voice`` task case, runs of spaces and a trailing period are
ignored).

Only the standard library is used, and nothing depends on hash randomisation,
so a seeded ``random.Random`` gives the same examples on every run.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

__all__ = [
    "Example",
    "TASK_NAMES",
    "GENERATORS",
    "ANSWER_FORMATS",
    "TASK_WEIGHTS",
    "arithmetic",
    "unit_conversion",
    "sort_numbers",
    "string_edit",
    "passive_voice",
    "list_stats",
    "temperature_list",
    "generate_example",
    "canonical_answer",
    "is_correct",
    "wrong_answers",
    "make_rejected",
]


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    completion: str


# --------------------------------------------------------------------------
# Templates: "{name:kind}" placeholders, rendered for generation and compiled
# to a regular expression for parsing in the checker.
# --------------------------------------------------------------------------

_FIELD_PATTERNS = {
    "int": r"-?\d+",
    "list": r"-?\d+(?:, -?\d+)*",
    "word": r"[a-z]+",
    "letter": r"[a-z]",
    "sentence": r"[A-Z][A-Za-z ]*[a-z]\.",
}
_PLACEHOLDER = re.compile(r"\{(\w+):(\w+)\}")


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _parse_field(kind: str, text: str):
    if kind == "int":
        return int(text)
    if kind == "list":
        return [int(t) for t in text.split(", ")]
    return text


class Template:
    def __init__(self, op: str, text: str):
        self.op = op
        self.text = text
        parts: List[str] = []
        self.kinds: Dict[str, str] = {}
        pos = 0
        for m in _PLACEHOLDER.finditer(text):
            name, kind = m.group(1), m.group(2)
            parts.append(re.escape(text[pos:m.start()]))
            parts.append(f"(?P<{name}>{_FIELD_PATTERNS[kind]})")
            self.kinds[name] = kind
            pos = m.end()
        parts.append(re.escape(text[pos:]))
        self.regex = re.compile("".join(parts))

    def render(self, fields: dict) -> str:
        return _PLACEHOLDER.sub(lambda m: _fmt(fields[m.group(1)]), self.text)

    def match(self, prompt: str):
        m = self.regex.fullmatch(prompt)
        if m is None:
            return None
        return {k: _parse_field(self.kinds[k], v) for k, v in m.groupdict().items()}


@dataclass(frozen=True)
class _Spec:
    name: str
    templates: Tuple[Template, ...]
    sample: Callable[[random.Random, str], dict]  # (rng, op) -> fields
    solve: Callable[[str, dict], str]  # (op, fields) -> canonical completion
    corrupt: Callable[[str, dict, str], List[str]]  # (op, fields, answer) -> wrong answers
    normalize: Callable[[str], str]

    @property
    def ops(self) -> List[str]:
        seen: List[str] = []
        for t in self.templates:
            if t.op not in seen:
                seen.append(t.op)
        return seen


def _templates(table: Sequence[Tuple[str, Sequence[str]]]) -> Tuple[Template, ...]:
    return tuple(Template(op, text) for op, texts in table for text in texts)


def _strip(text: str) -> str:
    return text.strip()


def _strip_lines(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _normalize_sentence(text: str) -> str:
    text = " ".join(text.split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def _skewed(rng: random.Random, lo: int, hi: int, power: float = 2.0) -> int:
    """Integer in [lo, hi], most mass near lo: a long tail towards hi."""
    return lo + min(hi - lo, int(rng.random() ** power * (hi - lo + 1)))


def _ndigits(rng: random.Random, lo: int, hi: int) -> int:
    d = rng.randint(lo, hi)
    return rng.randint(10 ** (d - 1), 10**d - 1)


# --------------------------------------------------------------------------
# 1. Integer arithmetic.  Answer: the integer, e.g. "579" or "-42".
# --------------------------------------------------------------------------

_ARITH_TEMPLATES = _templates([
    ("add", ["What is {a:int} + {b:int}?",
             "Calculate the sum of {a:int} and {b:int}.",
             "Add {a:int} and {b:int}."]),
    ("sub", ["What is {a:int} - {b:int}?",
             "Subtract {b:int} from {a:int}.",
             "Calculate {a:int} minus {b:int}."]),
    ("mul", ["What is {a:int} * {b:int}?",
             "Multiply {a:int} by {b:int}.",
             "Calculate the product of {a:int} and {b:int}."]),
])


def _arith_sample(rng, op):
    if op == "mul":  # 2-4 digit times 2 digit keeps products at most 6 digits
        return {"a": _ndigits(rng, 2, 4), "b": _ndigits(rng, 2, 2)}
    return {"a": _ndigits(rng, 2, 4), "b": _ndigits(rng, 2, 4)}


def _arith_value(op, f):
    a, b = f["a"], f["b"]
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


def _arith_corrupt(op, f, answer):
    r = _arith_value(op, f)
    out = [r + 1, r - 1, r + 10, r - 10]
    if op == "sub":
        out.append(f["b"] - f["a"])  # sign error
    if op == "mul":
        out += [r + f["a"], r - f["a"]]  # one copy too many / too few
    if op == "add":
        out.append(r + 100)
    return [str(v) for v in out]


# --------------------------------------------------------------------------
# 2. Unit conversion.  Answer: "<integer> <unit symbol>", e.g. "5000 m",
#    "3 kg", "150 min", "2 h", "77 °F".
# --------------------------------------------------------------------------

_UNIT_TEMPLATES = _templates([
    ("km_m", ["Convert {x:int} kilometers to meters.",
              "How many meters are there in {x:int} km?"]),
    ("m_km", ["Convert {x:int} meters to kilometers.",
              "How many kilometers is {x:int} m?"]),
    ("kg_g", ["Convert {x:int} kilograms to grams.",
              "How many grams are there in {x:int} kg?"]),
    ("g_kg", ["Convert {x:int} grams to kilograms.",
              "How many kilograms is {x:int} g?"]),
    ("h_min", ["Convert {x:int} hours to minutes.",
               "How many minutes are there in {x:int} hours?"]),
    ("min_h", ["Convert {x:int} minutes to hours.",
               "How many hours is {x:int} minutes?"]),
    ("c_f", ["Convert {x:int} degrees Celsius to Fahrenheit.",
             "What is {x:int} °C in degrees Fahrenheit?"]),
])

# op -> (factor, source unit, target unit); c_f is special-cased.
_UNITS = {
    "km_m": (1000, "km", "m"),
    "m_km": (1000, "m", "km"),
    "kg_g": (1000, "kg", "g"),
    "g_kg": (1000, "g", "kg"),
    "h_min": (60, "h", "min"),
    "min_h": (60, "min", "h"),
}


def _c_to_f(c: int) -> int:
    if c % 5:  # generated prompts only use multiples of 5, so °F is an integer
        raise ValueError(f"{c} °C is not a whole number of °F")
    return c * 9 // 5 + 32


def _unit_sample(rng, op):
    if op == "c_f":
        return {"x": 5 * rng.randint(-8, 24)}  # -40 .. 120 °C, integer °F
    big = 48 if op in ("h_min", "min_h") else 500
    n = rng.randint(2, big)
    if op in ("m_km", "g_kg", "min_h"):
        return {"x": n * _UNITS[op][0]}
    return {"x": n}


def _unit_value(op, f):
    x = f["x"]
    if op == "c_f":
        return _c_to_f(x), "°F"
    factor, _, target = _UNITS[op]
    if op in ("km_m", "kg_g", "h_min"):
        return x * factor, target
    if x % factor:  # generated prompts always convert to whole target units
        raise ValueError(f"{x} is not a whole number of {target}")
    return x // factor, target


def _unit_solve(op, f):
    value, unit = _unit_value(op, f)
    return f"{value} {unit}"


def _unit_corrupt(op, f, answer):
    value, unit = _unit_value(op, f)
    x = f["x"]
    if op == "c_f":
        vals = [value + 1, value - 1, x * 9 // 5, 2 * x + 30, x + 32]
        return [f"{v} {unit}" for v in vals]
    factor, source, _ = _UNITS[op]
    if op in ("km_m", "kg_g", "h_min"):
        vals = [x * 100, value + factor, value - factor]
    else:
        vals = [value * 10, value + 1, value - 1]
    out = [f"{v} {unit}" for v in vals]
    out.append(f"{value} {source}")  # right number, wrong unit
    return out


# --------------------------------------------------------------------------
# 3. Sorting.  Answer: the sorted numbers separated by ", " (no brackets).
# --------------------------------------------------------------------------

_SORT_TEMPLATES = _templates([
    ("asc", ["Sort these numbers in ascending order: {nums:list}",
             "Sort the list [{nums:list}] from smallest to largest.",
             "Put the following numbers in increasing order: {nums:list}"]),
    ("desc", ["Sort these numbers in descending order: {nums:list}",
              "Sort the list [{nums:list}] from largest to smallest.",
              "Put the following numbers in decreasing order: {nums:list}"]),
])


def _sort_sample(rng, op):
    n = _skewed(rng, 3, 40)
    lo, hi = rng.choice([(0, 99), (0, 999), (0, 999), (-99, 99)])
    return {"nums": [rng.randint(lo, hi) for _ in range(n)]}


def _sorted(op, nums):
    return sorted(nums, reverse=(op == "desc"))


def _sort_solve(op, f):
    return _fmt(_sorted(op, f["nums"]))


def _sort_corrupt(op, f, answer):
    s = _sorted(op, f["nums"])
    out = []
    for i in range(len(s) - 1):  # first adjacent pair that differs, swapped
        if s[i] != s[i + 1]:
            t = list(s)
            t[i], t[i + 1] = t[i + 1], t[i]
            out.append(t)
            break
    mid = len(s) // 2
    out.append(s[:mid] + s[mid + 1:])  # one element missing
    out.append(s[::-1])  # wrong direction
    out.append(s[:mid] + [s[mid]] + s[mid:])  # one element duplicated
    out.append(list(f["nums"]))  # left unsorted
    return [_fmt(t) for t in out]


# --------------------------------------------------------------------------
# 4. String edits.  Answer: the resulting string (reverse / upper /
#    remove_vowels) or the count as an integer (count).
# --------------------------------------------------------------------------

_WORDS = (
    "apple banana cherry orange lemon mango grape melon peach plum "
    "table chair window garden kitchen blanket pillow mirror candle ladder "
    "river mountain forest island desert valley canyon meadow glacier volcano "
    "planet rocket comet galaxy station engine bridge tunnel harbor castle "
    "teacher student doctor farmer painter singer dancer pilot sailor baker "
    "purple yellow silver golden crimson violet scarlet turquoise magenta "
    "happy quick clever gentle brave quiet lucky simple honest curious "
    "music letter number pencil paper school market village city country "
    "winter summer autumn spring morning evening midnight thunder rainbow "
    "computer keyboard monitor printer network program library function "
    "elephant giraffe kangaroo penguin dolphin octopus squirrel butterfly "
    "hamster rabbit turtle parrot tiger zebra monkey lizard falcon beaver "
    "strawberry pineapple watermelon blueberry raspberry coconut avocado "
    "adventure basketball chocolate dictionary encyclopedia helicopter "
    "independent information mathematics photograph refrigerator "
    "umbrella vacation wonderful yesterday tomorrow together language "
    "cat dog sun sky sea map cup hat box pen "
    "banana level radar kayak rotor civic madam noon "
    "mississippi bookkeeper committee balloon coffee cookie puzzle"
).split()
_WORDS = tuple(dict.fromkeys(_WORDS))  # de-duplicate, keep order
_VOWELS = "aeiou"

_STRING_TEMPLATES = _templates([
    ("reverse", ['Reverse the word "{w:word}".',
                 'Write "{w:word}" backwards.',
                 "Spell the word {w:word} in reverse order."]),
    ("upper", ['Convert "{w:word}" to uppercase.',
               "Write the word {w:word} in capital letters."]),
    ("remove_vowels", ['Remove all vowels from "{w:word}".',
                       "Delete the vowels (a, e, i, o, u) from the word {w:word}."]),
    ("count", ['How many times does the letter "{c:letter}" appear in "{w:word}"?',
               "Count how often the letter {c:letter} occurs in the word {w:word}."]),
])


def _string_sample(rng, op):
    w = rng.choice(_WORDS)
    if op != "count":
        return {"w": w}
    if rng.random() < 0.85:
        c = rng.choice(w)
    else:
        c = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return {"c": c, "w": w}


def _remove_vowels(w: str) -> str:
    return "".join(ch for ch in w if ch not in _VOWELS)


def _string_solve(op, f):
    w = f["w"]
    if op == "reverse":
        return w[::-1]
    if op == "upper":
        return w.upper()
    if op == "remove_vowels":
        return _remove_vowels(w)
    return str(w.count(f["c"]))


def _string_corrupt(op, f, answer):
    w = f["w"]
    if op == "reverse":
        r = w[::-1]
        out = [w]
        if len(r) >= 3:
            m = len(r) // 2
            out.append(r[:m - 1] + r[m] + r[m - 1] + r[m + 1:])  # two letters swapped
            out.append(r[:m] + r[m + 1:])  # one letter dropped
        return out
    if op == "upper":
        return [w.capitalize(), w.upper()[:-1] + w[-1], w]
    if op == "remove_vowels":
        vowel_pos = [i for i, ch in enumerate(w) if ch in _VOWELS]
        out = []
        if vowel_pos:
            keep = vowel_pos[-1]  # one vowel left behind
            out.append("".join(ch for i, ch in enumerate(w) if ch not in _VOWELS or i == keep))
        out.append(_remove_vowels(w).replace("y", ""))
        out.append(w)
        return out
    n = w.count(f["c"])
    return [str(n + 1), str(max(n - 1, 0)), str(n + 2)]


# --------------------------------------------------------------------------
# 5. Active -> passive rewrite.  Answer: one sentence,
#    "<Object> was/were <participle> by <subject>."
# --------------------------------------------------------------------------

# Verb table: past tense, past participle, allowed object kinds.
# Object kinds: a = animate, t = portable thing, f = food, w = writing,
# s = structure, v = vehicle.
_VERBS = (
    ("chased", "chased", "a"), ("saw", "seen", "atfwsv"), ("found", "found", "atfw"),
    ("helped", "helped", "a"), ("visited", "visited", "as"), ("called", "called", "a"),
    ("thanked", "thanked", "a"), ("followed", "followed", "av"), ("bit", "bitten", "af"),
    ("woke", "woken", "a"), ("forgot", "forgotten", "atw"), ("drew", "drawn", "atsv"),
    ("painted", "painted", "tsv"), ("washed", "washed", "atv"), ("fed", "fed", "a"),
    ("ate", "eaten", "f"), ("wrote", "written", "w"), ("read", "read", "w"),
    ("took", "taken", "tfw"), ("broke", "broken", "tsv"), ("threw", "thrown", "tf"),
    ("caught", "caught", "at"), ("built", "built", "sv"), ("stole", "stolen", "tfv"),
    ("hid", "hidden", "tfw"), ("drove", "driven", "v"), ("sold", "sold", "tfsv"),
    ("bought", "bought", "tfv"), ("opened", "opened", "st"), ("cleaned", "cleaned", "tsv"),
    ("fixed", "fixed", "tsv"), ("carried", "carried", "atf"), ("shook", "shaken", "t"),
    ("chose", "chosen", "atfsv"), ("gave away", "given away", "tfw"), ("baked", "baked", "f"),
    ("cooked", "cooked", "f"), ("dropped", "dropped", "tf"), ("sang", "sung", "w"),
    ("rode", "ridden", "v"), ("sent", "sent", "tfw"), ("praised", "praised", "aw"),
)
_PAST_TO_PP = {past: pp for past, pp, _ in _VERBS}

# (singular, plural) noun pairs by kind
_POOLS = {
    "a": (("cat", "cats"), ("dog", "dogs"), ("teacher", "teachers"), ("farmer", "farmers"),
          ("doctor", "doctors"), ("student", "students"), ("pilot", "pilots"),
          ("baker", "bakers"), ("nurse", "nurses"), ("child", "children"), ("fox", "foxes"),
          ("horse", "horses"), ("neighbor", "neighbors"), ("king", "kings"),
          ("queen", "queens"), ("girl", "girls"), ("boy", "boys"), ("chef", "chefs"),
          ("mouse", "mice"), ("rabbit", "rabbits")),
    "t": (("ball", "balls"), ("key", "keys"), ("box", "boxes"), ("vase", "vases"),
          ("lamp", "lamps"), ("wallet", "wallets"), ("cup", "cups"), ("bag", "bags"),
          ("clock", "clocks"), ("umbrella", "umbrellas")),
    "f": (("cake", "cakes"), ("apple", "apples"), ("cookie", "cookies"),
          ("sandwich", "sandwiches"), ("pie", "pies"), ("pizza", "pizzas"),
          ("carrot", "carrots"), ("egg", "eggs"), ("muffin", "muffins"), ("pear", "pears")),
    "w": (("letter", "letters"), ("book", "books"), ("poem", "poems"), ("song", "songs"),
          ("story", "stories"), ("note", "notes"), ("report", "reports")),
    "s": (("house", "houses"), ("bridge", "bridges"), ("fence", "fences"), ("door", "doors"),
          ("window", "windows"), ("shed", "sheds"), ("wall", "walls"), ("tower", "towers")),
    "v": (("car", "cars"), ("bike", "bikes"), ("boat", "boats"), ("truck", "trucks"),
          ("bus", "buses"), ("wagon", "wagons")),
}
_ADJECTIVES = {  # adjectives for animate nouns ("a") and for everything else ("")
    "a": ("old", "young", "small", "big", "lazy", "clever", "tired", "happy", "little",
          "angry", "quiet", "brown", "friendly", "hungry", "brave"),
    "": ("old", "small", "big", "red", "new", "little", "blue", "shiny", "heavy",
         "green", "long", "strange", "famous", "broken"),
}
_NAMES = ("Alice", "Ben", "Maria", "Tom", "Sara", "David", "Lena", "Omar", "Priya", "Kenji")
_PLURALS = {pl for pool in _POOLS.values() for _, pl in pool}

_PASSIVE_TEMPLATES = _templates([
    ("passive", ["Rewrite this sentence in the passive voice: {s:sentence}",
                 "Convert to passive voice: {s:sentence}",
                 'Change the sentence "{s:sentence}" from active to passive voice.']),
])


def _noun_phrase(rng, kind, plural_p=0.3):
    sing, plur = rng.choice(_POOLS[kind])
    noun = plur if rng.random() < plural_p else sing
    if rng.random() < 0.4:
        noun = rng.choice(_ADJECTIVES["a" if kind == "a" else ""]) + " " + noun
    return "the " + noun


def _passive_sample(rng, op):
    past, _, kinds = rng.choice(_VERBS)
    if rng.random() < 0.25:
        subj = rng.choice(_NAMES)
    else:
        subj = _noun_phrase(rng, "a")
    while True:
        obj = _noun_phrase(rng, rng.choice(kinds))
        if obj != subj:
            break
    return {"s": f"{subj[0].upper()}{subj[1:]} {past} {obj}."}


def _split_sentence(s: str):
    body = s[:-1]
    for past in sorted(_PAST_TO_PP, key=len, reverse=True):
        key = f" {past} "
        if key in body:
            subj, obj = body.split(key, 1)
            return subj, past, obj
    raise ValueError(f"no known verb in sentence: {s!r}")


def _lower_article(np: str) -> str:
    return "the" + np[3:] if np.startswith("The ") else np


def _cap(np: str) -> str:
    return np[0].upper() + np[1:]


def _is_plural(np: str) -> bool:
    return np.split()[-1] in _PLURALS


def _passive(subj, verb_form, obj, aux=None):
    if aux is None:
        aux = "were" if _is_plural(obj) else "was"
    return f"{_cap(obj)} {aux} {verb_form} by {_lower_article(subj)}."


def _passive_solve(op, f):
    subj, past, obj = _split_sentence(f["s"])
    return _passive(subj, _PAST_TO_PP[past], obj)


def _passive_corrupt(op, f, answer):
    subj, past, obj = _split_sentence(f["s"])
    pp = _PAST_TO_PP[past]
    right_aux = "were" if _is_plural(obj) else "was"
    wrong_aux = "was" if right_aux == "were" else "were"
    out = [
        f["s"],  # active voice kept
        _passive(obj, pp, _lower_article(subj)),  # roles swapped
        _passive(subj, pp, obj, aux=wrong_aux),  # agreement error
    ]
    if past != pp:
        out.append(_passive(subj, past, obj))  # simple past instead of participle
    return out


# --------------------------------------------------------------------------
# 6. List statistics (long prompts).  Answer: "Sum: S, min: A, max: B".
# --------------------------------------------------------------------------

_STATS_TEMPLATES = _templates([
    ("stats", ["Summarize the numbers: give the sum, min and max of this list: {nums:list}",
               "Here are some numbers: {nums:list}. What are their sum, minimum and maximum?",
               "Compute the sum, the smallest value and the largest value of [{nums:list}]."]),
])


def _stats_sample(rng, op):
    n = _skewed(rng, 5, 80, power=2.5)
    hi = rng.choice([99, 999])
    return {"nums": [rng.randint(1, hi) for _ in range(n)]}


def _stats_text(s, lo, hi):
    return f"Sum: {s}, min: {lo}, max: {hi}"


def _stats_solve(op, f):
    nums = f["nums"]
    return _stats_text(sum(nums), min(nums), max(nums))


def _stats_corrupt(op, f, answer):
    nums = f["nums"]
    s, lo, hi = sum(nums), min(nums), max(nums)
    out = [
        _stats_text(s + 1, lo, hi),
        _stats_text(s - 10, lo, hi),
        _stats_text(s - nums[-1], lo, hi),  # last element left out of the sum
        _stats_text(s, hi, lo),  # min and max swapped
    ]
    distinct = sorted(set(nums))
    if len(distinct) > 1:
        out.append(_stats_text(s, lo, distinct[-2]))  # second largest as max
    return out


# --------------------------------------------------------------------------
# 7. Temperature list (long completions).  Answer: one line per input value,
#    in input order, "<C> °C = <F> °F", lines joined by "\n".
# --------------------------------------------------------------------------

_TEMP_TEMPLATES = _templates([
    ("temps", ["Convert these temperatures from Celsius to Fahrenheit: {temps:list}",
               "Convert each Celsius temperature to Fahrenheit, one per line: {temps:list}",
               "Here is a list of temperatures in °C: {temps:list}. Give each one in °F."]),
])


def _temp_sample(rng, op):
    n = _skewed(rng, 2, 30, power=2.5)
    return {"temps": [5 * rng.randint(-8, 24) for _ in range(n)]}


def _temp_lines(pairs):
    return "\n".join(f"{c} °C = {f} °F" for c, f in pairs)


def _temp_solve(op, f):
    return _temp_lines((c, _c_to_f(c)) for c in f["temps"])


def _temp_corrupt(op, f, answer):
    temps = f["temps"]
    right = [(c, _c_to_f(c)) for c in temps]
    k = len(right) // 2
    off_by_one = list(right)
    off_by_one[k] = (right[k][0], right[k][1] + 1)
    no_offset = list(right)
    no_offset[k] = (right[k][0], right[k][0] * 9 // 5)  # forgot the +32
    return [
        _temp_lines(off_by_one),
        _temp_lines(no_offset),
        _temp_lines(right[:k] + right[k + 1:]),  # one value missing
        _temp_lines((c, 2 * c + 30) for c in temps),  # "double and add 30" shortcut
        _temp_lines(sorted(right)),  # reordered
    ]


# --------------------------------------------------------------------------
# Registry and public API
# --------------------------------------------------------------------------

_SPECS: Dict[str, _Spec] = {
    s.name: s
    for s in (
        _Spec("arithmetic", _ARITH_TEMPLATES, _arith_sample,
              lambda op, f: str(_arith_value(op, f)), _arith_corrupt, _strip),
        _Spec("unit_conversion", _UNIT_TEMPLATES, _unit_sample, _unit_solve,
              _unit_corrupt, _strip),
        _Spec("sort", _SORT_TEMPLATES, _sort_sample, _sort_solve, _sort_corrupt, _strip),
        _Spec("string_edit", _STRING_TEMPLATES, _string_sample, _string_solve,
              _string_corrupt, _strip),
        _Spec("passive_voice", _PASSIVE_TEMPLATES, _passive_sample, _passive_solve,
              _passive_corrupt, _normalize_sentence),
        _Spec("list_stats", _STATS_TEMPLATES, _stats_sample, _stats_solve,
              _stats_corrupt, _strip),
        _Spec("temperature_list", _TEMP_TEMPLATES, _temp_sample, _temp_solve,
              _temp_corrupt, _strip_lines),
    )
}

TASK_NAMES: Tuple[str, ...] = tuple(_SPECS)

# Relative frequency of each task in every generated split.  Most examples are
# short; sort / list_stats / temperature_list make the long tail.
TASK_WEIGHTS: Dict[str, float] = {
    "arithmetic": 0.20,
    "unit_conversion": 0.15,
    "sort": 0.15,
    "string_edit": 0.18,
    "passive_voice": 0.16,
    "list_stats": 0.08,
    "temperature_list": 0.08,
}

ANSWER_FORMATS: Dict[str, str] = {
    "arithmetic": 'the integer result only, e.g. "579" or "-42"',
    "unit_conversion": 'integer value, a space, the unit symbol: "5000 m", "3 kg", "150 min", "2 h", "77 °F"',
    "sort": 'the sorted numbers joined by ", " without brackets, e.g. "1, 5, 9"',
    "string_edit": 'the edited word ("ananab", "BANANA", "bnn") or, for letter counts, the integer ("3")',
    "passive_voice": 'one sentence "<Object> was/were <participle> by <agent>.", e.g. "The dog was chased by the cat."',
    "list_stats": '"Sum: S, min: A, max: B"',
    "temperature_list": 'one line per input value, in input order: "<C> °C = <F> °F"',
}


def _spec(task: str) -> _Spec:
    try:
        return _SPECS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}") from None


def generate_example(task: str, rng: random.Random) -> Example:
    spec = _spec(task)
    op = rng.choice(spec.ops)
    template = rng.choice([t for t in spec.templates if t.op == op])
    fields = spec.sample(rng, op)
    prompt = template.render(fields)
    return Example(task, prompt, spec.solve(op, fields))


def arithmetic(rng: random.Random) -> Example:
    return generate_example("arithmetic", rng)


def unit_conversion(rng: random.Random) -> Example:
    return generate_example("unit_conversion", rng)


def sort_numbers(rng: random.Random) -> Example:
    return generate_example("sort", rng)


def string_edit(rng: random.Random) -> Example:
    return generate_example("string_edit", rng)


def passive_voice(rng: random.Random) -> Example:
    return generate_example("passive_voice", rng)


def list_stats(rng: random.Random) -> Example:
    return generate_example("list_stats", rng)


def temperature_list(rng: random.Random) -> Example:
    return generate_example("temperature_list", rng)


GENERATORS: Dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": arithmetic,
    "unit_conversion": unit_conversion,
    "sort": sort_numbers,
    "string_edit": string_edit,
    "passive_voice": passive_voice,
    "list_stats": list_stats,
    "temperature_list": temperature_list,
}


def _parse(task: str, prompt: str):
    spec = _spec(task)
    prompt = prompt.strip()
    matches = []
    for t in spec.templates:
        fields = t.match(prompt)
        if fields is not None:
            matches.append((t.op, fields))
    if not matches:
        raise ValueError(f"prompt does not match any {task!r} template: {prompt!r}")
    if len({op for op, _ in matches}) > 1:
        raise ValueError(f"ambiguous {task!r} prompt: {prompt!r}")
    return matches[0]


def canonical_answer(task: str, prompt: str) -> str:
    """The canonical completion for a prompt of the given task."""
    op, fields = _parse(task, prompt)
    return _spec(task).solve(op, fields)


def is_correct(task: str, prompt: str, completion_text: str) -> bool:
    """Whether ``completion_text`` is the right answer to ``prompt``.

    Exact match with the canonical answer after stripping whitespace
    (per line for ``temperature_list``; case, spacing and a final period are
    ignored for ``passive_voice``).  Raises ``ValueError`` for an unknown task
    or a prompt that no template of the task produces.
    """
    spec = _spec(task)
    return spec.normalize(completion_text) == spec.normalize(canonical_answer(task, prompt))


def wrong_answers(example: Example) -> List[str]:
    """Plausible wrong answers for an example, de-duplicated, in a fixed order."""
    spec = _spec(example.task)
    op, fields = _parse(example.task, example.prompt)
    right = spec.normalize(example.completion)
    out: List[str] = []
    for cand in spec.corrupt(op, fields, example.completion):
        if spec.normalize(cand) != right and cand not in out:
            out.append(cand)
    return out


def make_rejected(example: Example, rng: random.Random) -> str:
    """One plausible wrong answer for ``example`` (same format as the completion)."""
    candidates = wrong_answers(example)
    if not candidates:
        raise ValueError(f"no wrong answer available for {example!r}")
    return rng.choice(candidates)
