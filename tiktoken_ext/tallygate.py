"""tiktoken plugin: the encodings tallygate ships (pricing/encodings), hashes checked.

Registered as `tallygate_o200k_base` and `tallygate_cl100k_base`: tiktoken raises
"Duplicate encoding name" when two plugins register the same name, and openai_public
already has the plain ones. tiktoken imports every plugin module to list the encodings,
and an error here would break them all, so pricing is imported only when one is built.
"""


def _o200k_base() -> dict:
    from pricing.encodings import constructor

    return constructor("o200k_base")


def _cl100k_base() -> dict:
    from pricing.encodings import constructor

    return constructor("cl100k_base")


ENCODING_CONSTRUCTORS = {
    "tallygate_o200k_base": _o200k_base,
    "tallygate_cl100k_base": _cl100k_base,
}
