"""AWS regions inside the EU/EEA, and the one check every cloud entry point uses.

GDPR Art. 44: personal data may leave the EU/EEA only under the conditions of
Chapter V. canestra keeps data in EU/EEA regions by default and asks for an
explicit flag to use any other region.
"""

from __future__ import annotations

from canestra.errors import InputError

__all__ = ["EU_EEA_REGIONS", "check_region", "is_eu_eea"]

# AWS region codes physically inside an EU/EEA member state.
# Deliberately NOT listed: eu-west-2 (London, UK) and eu-central-2 (Zurich,
# Switzerland). Both are outside the EU/EEA and only covered by Commission
# adequacy decisions, so canestra treats them like any non-EU region: they
# need --allow-non-eu-region.
EU_EEA_REGIONS: frozenset[str] = frozenset(
    {
        "eu-west-1",  # Ireland
        "eu-west-3",  # Paris, France
        "eu-central-1",  # Frankfurt, Germany
        "eu-north-1",  # Stockholm, Sweden
        "eu-south-1",  # Milan, Italy
        "eu-south-2",  # Aragon, Spain
    }
)

ALLOW_FLAG = "--allow-non-eu-region"


def is_eu_eea(region: str) -> bool:
    """True when ``region`` is an AWS region code inside the EU/EEA."""
    return region.strip().lower() in EU_EEA_REGIONS


def check_region(region: str, allow_non_eu: bool, what: str) -> None:
    """Refuse a region outside the EU/EEA unless the user opted in explicitly.

    ``what`` names the thing being placed there (e.g. "S3 bucket", "EMR cluster")
    so the message tells the user which setting to change.
    """
    if not region or not region.strip():
        raise InputError(
            f"no AWS region given for the {what}: pass an EU/EEA region such as eu-west-3 "
            f"(one of {', '.join(sorted(EU_EEA_REGIONS))})"
        )
    if is_eu_eea(region) or allow_non_eu:
        return
    raise InputError(
        f"region {region!r} for the {what} is outside the EU/EEA (GDPR Art. 44): use one of "
        f"{', '.join(sorted(EU_EEA_REGIONS))}, or pass {ALLOW_FLAG} if a transfer safeguard is in place"
    )
