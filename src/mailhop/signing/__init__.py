"""DKIM signing of outgoing mail: the signer (``dkim``), keys and their DNS records (``keys``) and the delivery
hook that puts signatures in front of stored messages (``outbound``)."""

from .dkim import DkimSigner, Unsignable
from .keys import dns_record, generate_key, load_private_key
from .outbound import OutboundSigner, SigningFailed

__all__ = [
    "DkimSigner",
    "OutboundSigner",
    "SigningFailed",
    "Unsignable",
    "dns_record",
    "generate_key",
    "load_private_key",
]
