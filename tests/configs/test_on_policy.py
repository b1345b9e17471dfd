"""OnPolicyConfig and DistillationConfig(on_policy=...): defaults, dict / JSON round trips, every
bad value rejected at construction with the field named, the sampled-token loss's conditions."""

from __future__ import annotations

import pytest

import purekd
from purekd import DistillationConfig, OnPolicyConfig


def test_defaults_and_exports():
    config = OnPolicyConfig()
    assert (config.lmbda, config.seq_kd, config.max_new_tokens, config.temperature,
            config.top_p, config.top_k, config.stop_token_ids, config.pad_token_id,
            config.seed) == (1.0, False, 128, 1.0, 1.0, 0, (), None, 0)
    assert purekd.OnPolicyConfig is purekd.configs.OnPolicyConfig is OnPolicyConfig
    assert DistillationConfig().on_policy is None


def test_dict_and_json_round_trips():
    config = DistillationConfig(kd_loss_type=["sampled_reverse_kl", {"gamma": 0.9}],
                                temperature=1,
                                on_policy={"lmbda": 1.0, "temperature": 0.9, "top_p": 0.95,
                                           "top_k": 20, "stop_token_ids": [2, 7], "seed": 5})
    assert config.on_policy == OnPolicyConfig(temperature=0.9, top_p=0.95, top_k=20,
                                              stop_token_ids=(2, 7), seed=5)
    assert config.kd_loss == ("sampled_reverse_kl", {"gamma": 0.9})
    assert config.normalises_by_tokens
    assert DistillationConfig.from_dict(config.to_dict()) == config
    assert DistillationConfig.from_dict(__import__("json").loads(config.to_json())) == config
    assert OnPolicyConfig(stop_token_ids=2).stop_token_ids == (2,)


def test_the_sampling_temperature_is_not_the_loss_temperature():
    config = DistillationConfig(kd_loss_type="reverse_kl", temperature=2.0,
                                on_policy=OnPolicyConfig(temperature=0.9))
    assert config.temperature == 2.0 and config.on_policy.temperature == 0.9


@pytest.mark.parametrize("field, value, message", [
    ("lmbda", 1.5, r"OnPolicyConfig.lmbda=1.5: must be a number in \[0, 1\] \(the share of "
                   r"batches on which the student samples"),
    ("lmbda", -0.1, r"OnPolicyConfig.lmbda=-0.1: must be a number in \[0, 1\]"),
    ("lmbda", float("nan"), r"OnPolicyConfig.lmbda=nan: must be a number in \[0, 1\]"),
    ("max_new_tokens", 0, r"OnPolicyConfig.max_new_tokens=0: must be an int >= 1"),
    ("temperature", 0, r"OnPolicyConfig.temperature=0: must be a number > 0 \(the sampling "
                       r"temperature; for greedy decoding use top_k=1\). It is not the loss "
                       r"temperature, which is DistillationConfig.temperature"),
    ("top_p", 0.0, r"OnPolicyConfig.top_p=0.0: must be in \(0, 1\]"),
    ("top_k", -1, r"OnPolicyConfig.top_k=-1: must be an int >= 0"),
    ("stop_token_ids", ["a"], r"OnPolicyConfig.stop_token_ids=\('a',\): must be a list of "
                              r"token ids"),
    ("pad_token_id", -3, r"OnPolicyConfig.pad_token_id=-3: must be a token id"),
    ("seq_kd", 1, r"OnPolicyConfig.seq_kd=1: must be True or False"),
    ("seed", -1, r"OnPolicyConfig.seed=-1: must be an int >= 0"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        OnPolicyConfig(**{field: value})
    with pytest.raises(ValueError, match=r"DistillationConfig.on_policy: " + message):
        DistillationConfig(on_policy={field: value})


def test_unknown_keys_and_wrong_types():
    with pytest.raises(ValueError, match=r"DistillationConfig.on_policy: OnPolicyConfig: unknown "
                                         r"key\(s\) \['lambda'\]"):
        DistillationConfig(on_policy={"lambda": 0.5})
    with pytest.raises(TypeError, match=r"DistillationConfig.on_policy=3: give None, a "
                                        r"purekd.OnPolicyConfig or a dict of its fields"):
        DistillationConfig(on_policy=3)


def test_the_sampled_token_loss_needs_every_batch_sampled():
    with pytest.raises(ValueError, match=r"kd_loss_type='sampled_reverse_kl'\) with on_policy="
                                         r"None: the sampled-token loss estimates KL\(p_S \|\| "
                                         r"p_T\) from sequences the sampler drew"):
        DistillationConfig(kd_loss_type="sampled_reverse_kl")
    with pytest.raises(ValueError, match=r"with on_policy=OnPolicyConfig\(lmbda=0.5\)"):
        DistillationConfig(kd_loss_type="sampled_reverse_kl", on_policy={"lmbda": 0.5})
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\] \(the discount of the "
                                         r"sampled-token advantage"):
        DistillationConfig(kd_loss_type=["sampled_reverse_kl", {"gamma": 2}],
                           on_policy=OnPolicyConfig())


def test_cached_teacher_logits_cannot_score_rollouts():
    with pytest.raises(ValueError, match=r"DistillationConfig\(is_caching_logits=True, "
                                         r"on_policy=\.\.\.\): cached teacher logits belong to "
                                         r"the batch's own sequences"):
        DistillationConfig(is_caching_logits=True, on_policy=OnPolicyConfig())
    # every road to the combination: replace, from_dict (a distiller's dict config)
    with pytest.raises(ValueError, match=r"DistillationConfig\(is_caching_logits=True, "
                                         r"on_policy=\.\.\.\)"):
        DistillationConfig(on_policy=OnPolicyConfig()).replace(is_caching_logits=True)
    with pytest.raises(ValueError, match=r"DistillationConfig\(is_caching_logits=True, "
                                         r"on_policy=\.\.\.\)"):
        DistillationConfig.from_dict({"is_caching_logits": True, "on_policy": {"lmbda": 0.5}})


def test_shared_vocab_applies_to_the_sampled_token_loss_too():
    config = DistillationConfig(kd_loss_type="sampled_reverse_kl", shared_vocab=True,
                                on_policy=OnPolicyConfig())
    assert config.shared_vocab
    with pytest.raises(ValueError, match=r"shared_vocab=True with kd_loss_type='ce': the shared "
                                         r"vocabulary applies to the token-level divergences "
                                         r"\[.*\] and the sampled-token loss "
                                         r"\['sampled_reverse_kl'\]"):
        DistillationConfig(kd_loss_type="ce", shared_vocab=True)



def test_immutable():
    config = OnPolicyConfig()
    with pytest.raises(purekd.configs.ImmutableConfigError):
        config.lmbda = 0.5  # type: ignore[misc]
    assert config.replace(lmbda=0.5).lmbda == 0.5
