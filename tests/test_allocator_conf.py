"""torch's allocator settings as the environment gives them (estimator.configs.allocator)."""

import pytest
from zeroest.estimator.configs import allocator


def test_the_newer_variable_is_read_first_and_an_empty_one_is_skipped():
    assert allocator.conf_text({"PYTORCH_ALLOC_CONF": "expandable_segments:True",
                                "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}) == "expandable_segments:True"
    assert allocator.conf_text({"PYTORCH_ALLOC_CONF": "", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}) == \
        "max_split_size_mb:64"
    assert allocator.conf_text({}) == ""


@pytest.mark.parametrize(("text", "on"), [("expandable_segments:True", True), ("expandable_segments:False", False),
                                          ("max_split_size_mb:128, expandable_segments:True", True),
                                          ("expandable_segments:true", False), ("", False)])
def test_expandable_only_for_torchs_own_spelling_of_true(text, on):
    assert allocator.expandable(text) is on


def test_options_other_than_expandable_segments_are_named_as_not_modelled():
    assert allocator.unmodelled("expandable_segments:True,roundup_power2_divisions:4,max_split_size_mb:64") == \
        ["roundup_power2_divisions", "max_split_size_mb"]
    assert allocator.unmodelled("expandable_segments:True") == []
    assert allocator.unmodelled_note("max_split_size_mb:64,expandable_segments:True") == \
        "allocator settings 'max_split_size_mb:64,expandable_segments:True': max_split_size_mb not modelled"
    assert allocator.unmodelled_note("expandable_segments:True") is None


def test_with_expandable_replaces_the_option_and_keeps_the_rest_in_order():
    assert allocator.with_expandable("max_split_size_mb:64,expandable_segments:False", True) == \
        "expandable_segments:True,max_split_size_mb:64"
    assert allocator.with_expandable("", False) == "expandable_segments:False"


def test_an_entry_without_a_colon_is_one_error_line_that_says_how_to_write_it():
    with pytest.raises(ValueError, match="is not key:value: write it as expandable_segments:True"):
        allocator.options("expandable_segments")
