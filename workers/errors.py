"""Typed errors of the worker side. All are ValueError so callers can catch them broadly."""


class KVClusterInputError(ValueError):
    """A request the engine refuses: empty prompt, too long, bad token ids, bad parameters."""


class PromptTooLongError(KVClusterInputError):
    pass


class EmptyPromptError(KVClusterInputError):
    pass


class TokenOutOfVocabError(KVClusterInputError):
    pass


class InvalidParameterError(KVClusterInputError):
    pass


class DonorKVError(ValueError):
    """Donor KV that must not be used: another model's, wrong shape or dtype, or missing."""


class FingerprintMismatchError(DonorKVError):
    pass


class DonorShapeError(DonorKVError):
    pass


class DonorMissingError(DonorKVError):
    pass
