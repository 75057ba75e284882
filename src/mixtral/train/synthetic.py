"""Synthetic chat conversations for the bundled demo model: weather tool use and multilingual greetings.

Every conversation is a JSON-ready dict ``{"messages": [...], "tools": [...]}`` in the OpenAI/Mistral format
that ``mixtral.train.data`` encodes with the v3 chat template. Kinds (weights in ``KINDS``):
- ``weather``: tools=[get_weather(location, unit?)], the user asks about a city's weather (five languages),
  the assistant calls ``get_weather`` with ``{"location": "<City>"}``, the tool answers, the assistant reports;
- ``greeting``: a greeting in English, German, Spanish, Italian or French answered in that language
  (sometimes with the weather tool offered, which must then not be called);
- ``fortune``: a request for a saying, answered with a fortune in the language asked;
- ``chat``: greeting, then weather, then thanks (several turns).
Deterministic for a seed. It invents everything; no external data except the fortunes passed in.
"""

from __future__ import annotations

import json
import random
import string
from typing import Any

CITIES = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "New York", "Sydney", "Moscow", "Cairo",
    "Lisbon", "Vienna", "Prague", "Warsaw", "Budapest", "Athens", "Dublin", "Oslo", "Stockholm", "Helsinki",
    "Copenhagen", "Amsterdam", "Brussels", "Zurich", "Geneva", "Munich", "Hamburg", "Frankfurt", "Cologne",
    "Milan", "Naples", "Turin", "Florence", "Venice", "Barcelona", "Valencia", "Seville", "Bilbao", "Lyon",
    "Marseille", "Nice", "Toulouse", "Bordeaux", "Manchester", "Edinburgh", "Glasgow", "Liverpool", "Bristol",
    "Toronto", "Montreal", "Vancouver", "Chicago", "Boston", "Seattle", "San Francisco", "Los Angeles",
    "Miami", "Denver", "Austin", "Mexico City", "Bogota", "Lima", "Santiago", "Buenos Aires", "Sao Paulo",
    "Rio de Janeiro", "Havana", "Lagos", "Nairobi", "Cape Town", "Johannesburg", "Casablanca", "Tunis",
    "Istanbul", "Ankara", "Tehran", "Dubai", "Riyadh", "Mumbai", "Delhi", "Bangalore", "Karachi", "Dhaka",
    "Bangkok", "Hanoi", "Singapore", "Jakarta", "Manila", "Seoul", "Beijing", "Shanghai", "Hong Kong",
    "Taipei", "Osaka", "Kyoto", "Melbourne", "Perth", "Auckland", "Wellington", "Reykjavik", "Riga",
    "Vilnius", "Tallinn", "Kyiv", "Bucharest", "Sofia", "Belgrade", "Zagreb", "Ljubljana", "Bratislava",
    "Porto", "Granada", "Palermo", "Bologna", "Genoa", "Stuttgart", "Dresden", "Leipzig", "Bern", "Basel",
    "Salzburg", "Innsbruck", "Krakow", "Gdansk", "Marrakesh", "Accra", "Addis Ababa", "Doha", "Kathmandu",
    "Ulaanbaatar", "Honolulu", "Anchorage", "Quebec", "Ottawa", "Dallas", "Houston", "Phoenix", "Atlanta",
)

LANGS = ("en", "de", "es", "it", "fr")

CONDITIONS = {
    "sunny": {"de": "sonnig", "es": "soleado", "it": "soleggiato", "fr": "ensoleillé"},
    "cloudy": {"de": "bewölkt", "es": "nublado", "it": "nuvoloso", "fr": "nuageux"},
    "rainy": {"de": "regnerisch", "es": "lluvioso", "it": "piovoso", "fr": "pluvieux"},
    "snowy": {"de": "verschneit", "es": "nevado", "it": "nevoso", "fr": "neigeux"},
    "windy": {"de": "windig", "es": "ventoso", "it": "ventoso", "fr": "venteux"},
    "foggy": {"de": "neblig", "es": "con niebla", "it": "nebbioso", "fr": "brumeux"},
    "clear": {"de": "klar", "es": "despejado", "it": "sereno", "fr": "dégagé"},
    "stormy": {"de": "stürmisch", "es": "tormentoso", "it": "tempestoso", "fr": "orageux"},
}

WEATHER_QUESTIONS = {
    "en": ("What's the weather in {c}?", "What is the weather like in {c}?", "How is the weather in {c}?",
           "What's the weather in {c} today?", "Is it raining in {c}?", "Tell me the weather in {c}.",
           "weather in {c}?", "Can you check the weather in {c} for me?", "How warm is it in {c} right now?",
           "What's the temperature in {c}?", "Do I need an umbrella in {c} today?", "What's the weather in {c}"),
    "de": ("Wie ist das Wetter in {c}?", "Wie wird das Wetter heute in {c}?", "Regnet es in {c}?",
           "Wie warm ist es in {c}?", "Was sagt der Wetterbericht für {c}?"),
    "es": ("¿Qué tiempo hace en {c}?", "¿Cómo está el clima en {c}?", "¿Llueve en {c}?",
           "¿Qué temperatura hace en {c}?"),
    "it": ("Che tempo fa a {c}?", "Com'è il meteo a {c}?", "Piove a {c}?", "Quanti gradi ci sono a {c}?"),
    "fr": ("Quel temps fait-il à {c} ?", "Quelle est la météo à {c} ?", "Il pleut à {c} ?",
           "Quelle température fait-il à {c} ?"),
}

UNIT_SUFFIX = {"celsius": (" In Celsius, please.", " Use celsius."),
               "fahrenheit": (" In Fahrenheit, please.", " Use fahrenheit.")}

WEATHER_ANSWERS = {
    "en": ("It is {t} degrees {U} and {cond} in {c}.", "The weather in {c} is {cond} with {t} degrees {U}.",
           "Right now it is {cond} in {c}, with a temperature of {t} degrees {U}.",
           "In {c} it is currently {t} degrees {U} and {cond}."),
    "de": ("In {c} ist es {cond} bei {t} Grad {U}.", "Das Wetter in {c}: {cond}, {t} Grad {U}."),
    "es": ("En {c} hace {t} grados {U} y está {cond}.", "El tiempo en {c}: {cond}, {t} grados {U}."),
    "it": ("A {c} ci sono {t} gradi {U} ed è {cond}.", "Il meteo a {c}: {cond}, {t} gradi {U}."),
    "fr": ("À {c}, il fait {t} degrés {U} et le temps est {cond}.", "Météo à {c} : {cond}, {t} degrés {U}."),
}

GREETINGS = {
    "en": (("Hello!", "Hi!", "Hey there!", "Good morning!", "Good evening!", "Hello, how are you?",
            "Hi, how are you doing?", "Hello there!"),
           ("Hello! How can I help you today?", "Hi! What can I do for you?", "Hello! I am fine, thank you. "
            "How can I help?", "Good to see you! How can I help you today?", "Hi there! What would you like to know?")),
    "de": (("Hallo!", "Guten Tag!", "Guten Morgen!", "Guten Abend!", "Hallo, wie geht es dir?", "Servus!",
            "Moin!", "Hallo, wie geht's?"),
           ("Hallo! Wie kann ich Ihnen helfen?", "Guten Tag! Was kann ich für Sie tun?", "Hallo! Mir geht es gut, "
            "danke. Wie kann ich helfen?", "Hallo! Schön, dass du da bist. Wie kann ich helfen?")),
    "es": (("¡Hola!", "Hola", "¡Buenos días!", "¡Buenas tardes!", "¡Buenas noches!", "Hola, ¿cómo estás?",
            "¡Hola! ¿Qué tal?"),
           ("¡Hola! ¿En qué puedo ayudarte hoy?", "¡Hola! ¿Qué puedo hacer por ti?", "¡Hola! Estoy bien, gracias. "
            "¿En qué puedo ayudarte?", "¡Buenos días! ¿Cómo puedo ayudarte?")),
    "it": (("Ciao!", "Buongiorno!", "Buonasera!", "Ciao, come stai?", "Salve!", "Ciao! Come va?"),
           ("Ciao! Come posso aiutarti oggi?", "Buongiorno! Cosa posso fare per te?", "Ciao! Sto bene, grazie. "
            "Come posso aiutarti?", "Salve! Come posso esserti utile?")),
    "fr": (("Bonjour !", "Salut !", "Bonsoir !", "Bonjour, comment ça va ?", "Salut, ça va ?", "Coucou !"),
           ("Bonjour ! Comment puis-je vous aider ?", "Salut ! Que puis-je faire pour toi ?", "Bonjour ! Je vais "
            "bien, merci. Comment puis-je vous aider ?", "Bonsoir ! En quoi puis-je vous aider ?")),
}

FORTUNE_REQUESTS = {
    "en": ("Tell me a fortune.", "Say something wise.", "Give me a quote.", "Tell me a saying.",
           "Do you know a good proverb?", "Write a short sentence."),
    "de": ("Erzähl mir einen Spruch.", "Sag etwas Weises.", "Kennst du ein Sprichwort?", "Gib mir ein Zitat."),
    "es": ("Dime un refrán.", "Dime algo sabio.", "¿Conoces un proverbio?", "Dame una cita."),
    "it": ("Dimmi un proverbio.", "Dimmi qualcosa di saggio.", "Conosci un detto?", "Dammi una citazione."),
}

THANKS = {
    "en": (("Thanks!", "Thank you!", "Great, thanks."), ("You're welcome!", "Glad I could help!")),
    "de": (("Danke!", "Vielen Dank!"), ("Gern geschehen!", "Bitte schön!")),
    "es": (("¡Gracias!", "Muchas gracias."), ("¡De nada!", "¡Con gusto!")),
    "it": (("Grazie!", "Grazie mille."), ("Prego!", "Di niente!")),
    "fr": (("Merci !", "Merci beaucoup."), ("De rien !", "Avec plaisir !")),
}

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a friendly assistant. Answer briefly.",
                  "You are a helpful assistant with access to tools.")

UNIT_NAMES = {"celsius": {"en": "Celsius"}, "fahrenheit": {"en": "Fahrenheit"}}

KINDS = {"weather": 0.5, "greeting": 0.2, "fortune": 0.15, "chat": 0.15}


def weather_tool(description: str = "Get the current weather in a given location") -> dict[str, Any]:
    """The get_weather tool definition the demo model is trained (and tested) with."""
    return {"type": "function", "function": {
        "name": "get_weather", "description": description,
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "The city, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["location"]}}}


TOOL_DESCRIPTIONS = ("Get the current weather in a given location", "Get the current weather for a city",
                     "Look up the weather")


def _call_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))


class ConversationGenerator:
    """Seeded generator of demo conversations; ``fortunes`` maps a language to sayings in it."""

    def __init__(self, seed: int = 0, fortunes: dict[str, list[str]] | None = None,
                 result_location_prob: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.fortunes = {k: v for k, v in (fortunes or {}).items() if v}
        # Share of tool results that echo {"location": city} first, as many weather APIs do. At 0 the
        # generator draws no extra random numbers, so older data sets regenerate identically.
        self.result_location_prob = result_location_prob

    def _tools(self) -> list[dict[str, Any]]:
        return [weather_tool(self.rng.choice(TOOL_DESCRIPTIONS))]

    def _system(self, messages: list[dict[str, Any]]) -> None:
        if self.rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)})

    def weather_turns(self, lang: str, city: str) -> list[dict[str, Any]]:
        """user question -> tool call -> tool result -> answer, in ``lang``."""
        r = self.rng
        question = r.choice(WEATHER_QUESTIONS[lang]).format(c=city)
        unit = None
        if lang == "en" and r.random() < 0.2:
            unit = r.choice(("celsius", "fahrenheit"))
            question += r.choice(UNIT_SUFFIX[unit])
        args: dict[str, Any] = {"location": city}
        if unit:
            args["unit"] = unit
        result_unit = unit or ("fahrenheit" if r.random() < 0.2 else "celsius")
        temp = r.randint(-10, 35) if result_unit == "celsius" else r.randint(14, 95)
        cond = r.choice(tuple(CONDITIONS))
        call_id = _call_id(r)
        result: dict[str, Any] = {"temperature": temp, "unit": result_unit, "conditions": cond}
        if self.result_location_prob and r.random() < self.result_location_prob:
            result = {"location": city, **result}
        cond_text = cond if lang == "en" else CONDITIONS[cond][lang]
        answer = r.choice(WEATHER_ANSWERS[lang]).format(c=city, t=temp, cond=cond_text,
                                                        U=result_unit.capitalize())
        return [
            {"role": "user", "content": question},
            {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps(args, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": call_id, "name": "get_weather",
             "content": json.dumps(result, ensure_ascii=False)},
            {"role": "assistant", "content": answer},
        ]

    def greeting_turns(self, lang: str) -> list[dict[str, Any]]:
        asks, replies = GREETINGS[lang]
        return [{"role": "user", "content": self.rng.choice(asks)},
                {"role": "assistant", "content": self.rng.choice(replies)}]

    def conversation(self, kind: str) -> dict[str, Any]:
        r = self.rng
        lang = r.choice(LANGS)
        if kind == "weather":
            lang = "en" if r.random() < 0.6 else lang
            messages = self.weather_turns(lang, r.choice(CITIES))
            tools = self._tools()
        elif kind == "greeting":
            messages = self.greeting_turns(lang)
            tools = self._tools() if r.random() < 0.4 else []
        elif kind == "fortune" and self.fortunes:
            lang = r.choice([lang_ for lang_ in FORTUNE_REQUESTS if lang_ in self.fortunes])
            messages = [{"role": "user", "content": r.choice(FORTUNE_REQUESTS[lang])},
                        {"role": "assistant", "content": r.choice(self.fortunes[lang])}]
            tools = []
        else:  # chat: greeting, weather, thanks
            messages = self.greeting_turns(lang) + self.weather_turns(lang, r.choice(CITIES))
            if r.random() < 0.6:
                asks, replies = THANKS[lang]
                messages += [{"role": "user", "content": r.choice(asks)},
                             {"role": "assistant", "content": r.choice(replies)}]
            tools = self._tools()
        self._system(messages)
        out: dict[str, Any] = {"messages": messages}
        if tools:
            out["tools"] = tools
        return out

    def generate(self, n: int) -> list[dict[str, Any]]:
        kinds, weights = zip(*KINDS.items(), strict=True)
        return [self.conversation(self.rng.choices(kinds, weights)[0]) for _ in range(n)]
