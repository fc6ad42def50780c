"""schemas.masking: the one rule that masks credentials in mappings, lists and text."""

from __future__ import annotations

from pydantic import SecretStr

from schemas.masking import MASK, mask_secrets, mask_text, unmasked_secrets
from schemas.specs import StorageOptions

KEY_ID, SECRET = "AKIAEXAMPLEKEYID0001", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET0001"


def test_credentials_are_masked_in_mappings_lists_and_models_at_any_depth():
    data = {
        "storage": [{"access_key_id": KEY_ID, "secret_access_key": SECRET, "region": "eu"}],  # a list by mistake
        "nested": ({"deeper": [{"aws_session_token": "FwoGZXIvYXdzEJr", "api_token": None}]},),
        "model": StorageOptions(access_key_id=KEY_ID, secret_access_key=SECRET),
        "plain": SecretStr(SECRET),
        "top_k": 5,
    }

    masked = mask_secrets(data)

    assert masked["storage"] == [{"access_key_id": MASK, "secret_access_key": MASK, "region": "eu"}]
    assert masked["nested"] == ({"deeper": [{"aws_session_token": MASK, "api_token": None}]},)
    assert masked["model"]["access_key_id"] == masked["model"]["secret_access_key"] == MASK
    assert masked["plain"] == MASK and masked["top_k"] == 5
    assert KEY_ID not in repr(masked) and SECRET not in repr(masked) and unmasked_secrets(masked) == []


def test_credentials_written_inside_text_are_masked():
    reprs = {
        "a dict's repr": f"input_value=[{{'access_key_id': '{KEY_ID}', 'secret_access_key': '{SECRET}'}}]",
        "JSON": f'{{"secret_access_key": "{SECRET}", "endpoint_url": "http://x"}}',
        "key=value": f"StorageOptions(access_key_id={KEY_ID}, secret_access_key={SECRET})",
        "YAML": f"storage:\n  - access_key_id: {KEY_ID}\n    secret_access_key: {SECRET}",
        "a repr cut short": f"{{'secret_access_key': '{SECRET[:12]}...",
        "a list": f"password=['{SECRET}', 'x']",
    }
    for name, text in reprs.items():
        masked = mask_text(text)
        assert KEY_ID not in masked and SECRET[:12] not in masked and MASK in masked, (name, masked)
    assert "'endpoint_url': 'http://x'" in mask_text(f"{{'secret_access_key': '{SECRET}', 'endpoint_url': 'http://x'}}")
    plain = "batch_size: Input should be greater than 0 (got -4); access_key_id: None"
    assert mask_text(plain) == plain  # nothing secret, nothing changed
