"""Generate the fixed tokenizer training corpus ``models/tiny_llama_corpus.txt``.

The corpus is varied English prose assembled from sentence templates and word lists with a
seeded random generator, so the output is the same bytes on every run. The generated file is
committed; this script only documents how it was made and lets it be rebuilt.

Usage::

    python models/make_corpus.py [--out models/tiny_llama_corpus.txt] [--paragraphs 900]
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

SEED = 20240611
DEFAULT_OUT = Path(__file__).resolve().parent / "tiny_llama_corpus.txt"


def words(text: str) -> list[str]:
    """Split a block of whitespace-separated words into a list."""
    return text.split()


NAMES = words(
    """
    Ada Ben Clara Diego Elena Farid Grace Hiro Ines Jonas Kavya Liam Maya Nora Omar Priya
    Quinn Rosa Sam Tomas Uma Victor Wen Yara Zoe Arjun Bianca Chen Dmitri Esther Felix
    Gloria Hassan Isla Julian Keiko Lucia Mateo Nadia Oscar Petra Rafael Sofia Theo
    Valentina Wilhelm Ximena Amara Bruno Camille Dario Emeka Fatima Gustavo Helga Ibrahim
    Jasmine Kenji Leila Marcus Ngozi Olga Pablo Rania Stefan Tariq Ursula Vikram Wanjiru
    Yusuf Zainab
"""
)
PLACES = [
    "the harbor",
    "the old library",
    "a mountain village",
    "the city market",
    "the train station",
    "a quiet valley",
    "the river bank",
    "the university",
    "a small bakery",
    "the hospital",
    "the museum",
    "a crowded cafe",
    "the northern coast",
    "the orchard",
    "the laboratory",
    "the town square",
    "an empty warehouse",
    "the school garden",
    "the lighthouse",
    "the forest",
    "the airport",
    "a fishing boat",
    "the city hall",
    "a small island",
    "the post office",
    "the bus stop",
    "a farmhouse",
    "the office",
    "the rooftop",
    "the bookshop",
]
NOUNS = words(
    """
    letter map garden storm engine song bridge window question machine river lamp book clock
    report recipe journey signal boat market experiment painting meeting road festival
    project problem idea story plan computer network dataset server model teacher farmer
    doctor engineer student child neighbor traveler kitchen ladder blanket ticket harvest
    island village candle mirror pocket basket compass telescope violin helmet notebook
    pencil shadow tunnel valley bicycle camera forecast invoice contract schedule password
    keyboard database algorithm spreadsheet telephone umbrella wallet sculpture pattern
    theory puzzle riddle message parcel suitcase anchor apron archive balcony banner barrel
    beacon blueprint bottle bracelet brush bucket cabinet canal canyon carpet castle
    cathedral ceiling chimney circuit cliff coin collar corridor cottage courtyard crate
    curtain cushion diary drawer envelope fabric feather fence fountain furnace gallery
    glacier gravel hammer hedge horizon journal kettle lantern leaf lever meadow medal
    microscope mountain needle orchestra paddle pavement pillow planet porch quarry quilt
    railway ribbon rocket saddle satellite scarf shelf shovel skyline sparrow staircase
    statue stove sunflower thermometer thread tractor trumpet vineyard wagon whistle
    workshop
"""
)
ADJECTIVES = words(
    """
    quiet bright ancient curious careful heavy gentle strange simple warm cold narrow busy
    patient broken golden distant familiar sudden useful difficult clever small enormous
    honest tired fresh fragile precise noisy silent colorful ordinary remarkable modern
    rusty smooth rough elegant clumsy generous stubborn thoughtful cheerful gloomy hidden
    obvious reliable fragrant crooked hollow wooden invisible ambitious anxious bitter
    brilliant chilly crisp dusty eager faint fierce fluffy frozen glossy graceful humble icy
    jagged juicy lively lonely marvelous mysterious neat peculiar playful polite proud rapid
    rare shallow sharp shiny sleepy slippery sparkling spicy steady sturdy tender tiny vivid
    wealthy wise wrinkled
"""
)
VERBS_PAST = words(
    """
    found opened carried repaired described followed remembered built studied painted
    measured explained discovered shared questioned watched collected finished changed
    tested wrote planned lost borrowed returned cleaned delivered ignored imagined noticed
    organized polished protected recorded rescued sketched translated unpacked visited
    weighed whispered answered climbed counted decorated adjusted arranged assembled
    balanced calculated captured celebrated compared covered decided designed examined
    explored folded gathered guarded handled inspected invented launched mended negotiated
    observed prepared printed released replaced scanned searched selected sorted stitched
    trimmed wrapped
"""
)
ADVERBS = words(
    """
    slowly carefully quickly quietly suddenly gladly finally patiently rarely often gently
    boldly eagerly calmly nearly happily nervously loudly softly proudly briefly honestly
    clearly barely seriously angrily awkwardly bravely cheerfully curiously deliberately
    faithfully fondly foolishly generously gracefully hastily lazily mysteriously neatly
    openly politely rapidly silently swiftly tenderly warmly wisely
"""
)
TIMES = [
    "In the morning",
    "Late at night",
    "After the rain",
    "On a Tuesday",
    "Before dawn",
    "During the winter",
    "Every summer",
    "Years later",
    "At noon",
    "Later that week",
    "Long ago",
    "By the evening",
    "Soon after",
    "In the spring of 1998",
    "On the first day",
]
CONNECTORS = [
    "However",
    "Meanwhile",
    "Still",
    "Because of this",
    "In the end",
    "At first",
    "Then",
    "For a while",
    "Even so",
    "As a result",
    "Of course",
    "Afterwards",
]
TOPICS = words(
    """
    water memory light music weather language time trade friendship energy cooking
    mathematics history sleep travel software bees clouds soil bridges stars maps paper salt
    trees volcanoes tides glass coffee birds rivers chess printing vaccines agriculture
    architecture poetry weaving bread rainfall electricity navigation oceans deserts
    batteries telescopes gardens languages ants algebra astronomy ballet bamboo bicycles
    cheese copper cotton democracy dinosaurs earthquakes fungi geology glaciers honey
    insurance jazz lighthouses magnets medicine migration mushrooms origami photography
    pottery railways robotics sculpture silk spices sugar tea textiles typography whales
    wine wolves
"""
)
FACT_TEMPLATES = [
    "Most people think about {topic} only when it is missing.",
    "The study of {topic} has a long and {adj} history.",
    "Experts say that {topic} is more {adj} than it first appears.",
    "A simple way to understand {topic} is to compare it with {topic2}.",
    "There are at least {num} different ways to measure {topic}.",
    "In many countries, {topic} and {topic2} are taught together.",
    "Nobody fully agrees on what makes {topic} so {adj}.",
    "The first written record about {topic} is about {num} years old.",
    "Without {topic}, the world of {topic2} would look very different.",
    "Some researchers believe that {topic} explains a great deal about {topic2}.",
    "Children often ask why {topic} behaves the way it does.",
    "The economics of {topic} changed quickly after the invention of the {noun}.",
    "A {adj} example of {topic} can be found at {place}.",
    "Writers have described {topic} as {adj}, {adj2}, and sometimes even dangerous.",
]
STORY_TEMPLATES = [
    "{time}, {name} {verb} a {adj} {noun} near {place}.",
    "{name} walked {adv} toward {place} and thought about the {noun}.",
    '"Do you remember the {noun}?" asked {name}.',
    '"I think the {noun} is {adj}," said {name}, looking at {name2}.',
    "{connector}, {name} and {name2} {verb} the {noun} together.",
    "The {noun} was {adj}, and nobody at {place} knew why.",
    "{name} {adv} {verb} the {adj} {noun} and then sat down.",
    "It took {num} days before anyone {verb} the {noun} again.",
    "{connector}, the {adj} {noun} seemed less {adj2} than before.",
    "Nobody in {place} had ever seen such a {adj} {noun}.",
    '{name} wrote a short note: "Meet me at {place} at {hour} o\'clock."',
    "Why would anyone leave a {noun} at {place}?",
    "The wind {adv} moved the {noun} across {place}.",
    "{name} laughed, because the {noun} was far too {adj} for {name2}.",
    "When {name2} arrived at {place}, the {noun} was already gone.",
    "{name} had always wanted a {adj} {noun}, but never asked for one.",
    "There was a {adj} smell of rain and old paper at {place}.",
    '"We should go back," {name2} whispered, "before the {noun} gets {adj}."',
]
HOWTO_TEMPLATES = [
    "First, find a {adj} place to work.",
    "Next, take the {noun} and check it {adv}.",
    "If the {noun} looks {adj}, wait {num} minutes and try again.",
    "Make sure you keep the {noun} away from {place}.",
    "Finally, write down what you {verb} so that you can repeat it.",
    "Step {num}: put the {noun} next to the {noun2}.",
    "Do not rush; a {adj} approach usually works better.",
    "You will need a {noun}, a {noun2}, and about {num} minutes.",
    "Clean the {noun} before you start, otherwise the result will be {adj}.",
    "Ask a friend to hold the {noun} while you check the {noun2}.",
    "Repeat the last step {num} times, or until the {noun} feels {adj}.",
]
HANDWRITTEN = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Hello! How are you today? I am fine, thank you. Could you help me with a question?",
    "Sure, here is a short answer. The capital of France is Paris, and it lies on the Seine.",
    "Please summarize the following paragraph in one or two sentences.",
    "Write a short poem about the sea, the wind, and a small boat going home.",
    "Translate this sentence into simple English: the meeting has been postponed until Monday.",
    "Numbers matter too: 1, 2, 3, 10, 42, 100, 256, 1024, 2048, 3.14, 2.718, 50%, $19.99.",
    "Dates such as 2021-03-14, 12/05/1999 and March 3rd, 2010 appear in many documents.",
    "Email us at info@example.com or visit https://example.com/docs for more details.",
    "Q: What is the boiling point of water at sea level? A: About 100 degrees Celsius.",
    "Q: How many days are in a leap year? A: There are 366 days in a leap year.",
    "The function returns a list of integers; if the input is empty, it returns None.",
]


def fill(template: str, rng: random.Random) -> str:
    """Fill one template with random words."""
    name, name2 = rng.sample(NAMES, 2)
    topic, topic2 = rng.sample(TOPICS, 2)
    noun, noun2 = rng.sample(NOUNS, 2)
    adj, adj2 = rng.sample(ADJECTIVES, 2)
    text = template.format(
        name=name,
        name2=name2,
        topic=topic,
        topic2=topic2,
        noun=noun,
        noun2=noun2,
        adj=adj,
        adj2=adj2,
        verb=rng.choice(VERBS_PAST),
        adv=rng.choice(ADVERBS),
        place=rng.choice(PLACES),
        time=rng.choice(TIMES),
        connector=rng.choice(CONNECTORS),
        num=rng.choice([rng.randint(2, 60), rng.randint(2, 60), rng.randint(61, 5000)]),
        hour=rng.randint(1, 12),
    )
    # "a" before a vowel sound becomes "an" (good enough for these word lists).
    return re.sub(r"\b([Aa]) (?=[aeioAEIO])", r"\1n ", text)


def paragraph(rng: random.Random) -> str:
    """Build one paragraph of a randomly chosen style."""
    style = rng.random()
    if style < 0.5:
        templates = STORY_TEMPLATES
    elif style < 0.8:
        templates = FACT_TEMPLATES
    elif style < 0.95:
        templates = HOWTO_TEMPLATES
    else:
        return rng.choice(HANDWRITTEN)
    count = rng.randint(2, 8)
    return " ".join(fill(rng.choice(templates), rng) for _ in range(count))


def make_corpus(paragraphs: int, seed: int = SEED) -> str:
    """Return the whole corpus text: hand-written lines first, then generated paragraphs."""
    rng = random.Random(seed)
    parts = list(HANDWRITTEN)
    parts.extend(paragraph(rng) for _ in range(paragraphs))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--paragraphs", type=int, default=900)
    args = parser.parse_args()
    text = make_corpus(args.paragraphs)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode('utf-8'))} bytes)")


if __name__ == "__main__":
    main()
