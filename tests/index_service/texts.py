"""Small real-ish texts and a stand-in tokenizer for the index tests."""
import xxhash

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize "
    "foods from carbon dioxide and water. It generally involves the green pigment chlorophyll.",
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres off the coast of Queensland, Australia.",
    "Python is a high-level, general-purpose programming language. Its design philosophy emphasizes code "
    "readability with the use of significant indentation, and it supports multiple paradigms.",
]
QUESTION = "Question: which of these documents talks about a structure in Europe?"


def tokens(text: str) -> list[int]:
    """A deterministic stand-in tokenizer: one id per whitespace word."""
    return [xxhash.xxh32_intdigest(w.encode()) % 50000 for w in text.split()]
