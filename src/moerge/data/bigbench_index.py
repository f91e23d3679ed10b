"""The JSON tasks of the bigbench 1.0.0 sdist (sha256 `SDIST_SHA256`) and their subtasks.

Generated from the sdist's `bigbench/benchmark_tasks/**/task.json` files, so that a task name can be
checked before the ~360 MB sdist is downloaded and unpacked. Format: `task:` then its subtasks, a
continuation line starts with spaces. Regenerate with `python -m moerge.data.bigbench_index FOLDER`
(FOLDER: an extracted `benchmark_tasks`) if `bigbench.SDIST_SHA256` ever changes.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
"""The sdist this index lists (the index says nothing about any other)."""

_INDEX = """
abstract_narrative_understanding: 4_distractors 99_distractors 9_distractors
anachronisms:
analogical_similarity:
analytic_entailment:
arithmetic: 1_digit_addition 1_digit_division 1_digit_multiplication 1_digit_subtraction 2_digit_addition
    2_digit_division 2_digit_multiplication 2_digit_subtraction 3_digit_addition 3_digit_division
    3_digit_multiplication 3_digit_subtraction 4_digit_addition 4_digit_division 4_digit_multiplication
    4_digit_subtraction 5_digit_addition 5_digit_division 5_digit_multiplication 5_digit_subtraction
ascii_word_recognition:
authorship_verification: non_swapped swapped
auto_categorization:
auto_debugging:
bbq_lite_json: age_ambig age_disambig disability_status_ambig disability_status_disambig gender_identity_ambig
    gender_identity_disambig nationality_ambig nationality_disambig physical_appearance_ambig
    physical_appearance_disambig race_ethnicity_ambig race_ethnicity_disambig religion_ambig religion_disambig
    ses_ambig ses_disambig sexual_orientation_ambig sexual_orientation_disambig
bridging_anaphora_resolution_barqa:
causal_judgment:
cause_and_effect: one_sentence one_sentence_no_prompt two_sentences
checkmate_in_one:
chess_state_tracking: real_long real_medium real_short synthetic_long synthetic_medium synthetic_short
chinese_remainder_theorem:
cifar10_classification: base64 hex
code_line_description:
codenames:
color: hcl hex hsl rgb
common_morpheme:
conceptual_combinations: contradictions emergent_properties fanciful_fictional_combinations homonyms
    invented_words surprising_uncommon_combinations
conlang_translation: adna_from adna_to atikampe_from atikampe_to gornam_from gornam_to holuan_from holuan_to
    mkafala_from mkafala_to postpositive_english_from postpositive_english_to unapuri_from unapuri_to vaomi_from
    vaomi_to
contextual_parametric_knowledge_conflicts:
crash_blossom:
crass_ai:
cryobiology_spanish:
cryptonite:
cs_algorithms: lcs valid_parentheses
dark_humor_detection:
date_understanding:
disambiguation_qa:
discourse_marker_prediction:
disfl_qa:
dyck_languages:
elementary_math_qa: language_hint_only mathematical_hint_only question_only question_with_language_hint
    question_with_mathematical_hint
emoji_movie:
emojis_emotion_prediction:
empirical_judgments:
english_proverbs:
english_russian_proverbs:
entailed_polarity:
entailed_polarity_hindi:
epistemic_reasoning:
evaluating_information_essentiality:
fact_checker: covid19_scientific fever politifact
fantasy_reasoning:
few_shot_nlg:
figure_of_speech_detection:
formal_fallacies_syllogisms_negation:
gem: asset common_gen cs_restaurants e2e_nlg mlsum_de mlsum_es schema_guided_dialog turk webnlg_en webnlg_ru
    wikilingua_en wikilingua_multilingual xsum
gender_inclusive_sentences_german:
general_knowledge:
geometric_shapes:
goal_step_wikihow: goal_inference step_inference step_ordering
gre_reading_comprehension:
hhh_alignment: harmless helpful honest other
hindi_question_answering:
hindu_knowledge:
hinglish_toxicity:
human_organs_senses:
hyperbaton:
identify_math_theorems:
identify_odd_metaphor:
implicatures:
implicit_relations:
intent_recognition:
international_phonetic_alphabet_nli:
international_phonetic_alphabet_transliterate:
intersect_geometry: shapes_2 shapes_3 shapes_4 shapes_5 shapes_6
irony_identification:
kanji_ascii: kanji_ascii_meaning kanji_ascii_pronunciation
kannada:
key_value_maps: extends extends_agree_on extends_agree_on_only_differ extends_undef_on_only_differ
known_unknowns:
language_games: egg_encoded_target egg_plain_target pig_latin_decode pig_latin_encode pig_latin_encoded_target
    pig_latin_plain_target
language_identification:
linguistic_mappings: de_past_tense_irregular_json de_past_tense_json de_past_tense_regular_json
    past_tense_irregular_json past_tense_json past_tense_regular_json plural_irregular_json plural_json
    plural_regular_json pronoun_replacement_json question_formation_json sentence_negation_json
linguistics_puzzles:
list_functions: 00_shot_baseline 01_shot_baseline 02_shot_baseline 03_shot_baseline 04_shot_baseline
    05_shot_baseline 06_shot_baseline 07_shot_baseline 08_shot_baseline 09_shot_baseline 10_shot_baseline c001
    c002 c003 c004 c005 c006 c007 c008 c009 c010 c011 c012 c013 c014 c015 c016 c017 c018 c019 c020 c021 c022
    c023 c024 c025 c026 c027 c028 c029 c030 c031 c032 c033 c034 c035 c036 c037 c038 c039 c040 c041 c042 c043
    c044 c045 c046 c047 c048 c049 c050 c051 c052 c053 c054 c055 c056 c057 c058 c059 c060 c061 c062 c063 c064
    c065 c066 c067 c068 c069 c070 c071 c072 c073 c074 c075 c076 c077 c078 c079 c080 c081 c082 c083 c084 c085
    c086 c087 c088 c089 c090 c091 c092 c093 c094 c095 c096 c097 c098 c099 c100 c101 c102 c103 c104 c105 c106
    c107 c108 c109 c110 c111 c112 c113 c114 c115 c116 c117 c118 c119 c120 c121 c122 c123 c124 c125 c126 c127
    c128 c129 c130 c131 c132 c133 c134 c135 c136 c137 c138 c139 c140 c141 c142 c143 c144 c145 c146 c147 c148
    c149 c150 c151 c152 c153 c154 c155 c156 c157 c158 c159 c160 c161 c162 c163 c164 c165 c166 c167 c168 c169
    c170 c171 c172 c173 c174 c175 c176 c177 c178 c179 c180 c181 c182 c183 c184 c185 c186 c187 c188 c189 c190
    c191 c192 c193 c194 c195 c196 c197 c198 c199 c200 c201 c202 c203 c204 c205 c206 c207 c208 c209 c210 c211
    c212 c213 c214 c215 c216 c217 c218 c219 c220 c221 c222 c223 c224 c225 c226 c227 c228 c229 c230 c231 c232
    c233 c234 c235 c236 c237 c238 c239 c240 c241 c242 c243 c244 c245 c246 c247 c248 c249 c250
logic_grid_puzzle:
logical_args:
logical_deduction: five_objects seven_objects three_objects
logical_fallacy_detection:
logical_sequence:
mathematical_induction:
matrixshapes:
metaphor_boolean:
metaphor_understanding: lit2met met2lit
minute_mysteries_qa: freetext multiplechoice
misconceptions:
misconceptions_russian:
mnist_ascii:
modified_arithmetic: three_digit_addition_control three_digit_addition_plus_one three_digit_subtraction_control
    three_digit_subtraction_plus_one two_digit_multiplication_control two_digit_multiplication_plus_one
moral_permissibility:
movie_dialog_same_or_different:
movie_recommendation:
mult_data_wrangling: add_punctuation_1_dates_1 add_punctuation_1_dates_2 add_punctuation_2_dates_1
    add_punctuation_2_dates_2 add_time_1_times_1 add_time_1_times_2 add_time_2_times_1 add_time_2_times_2
    add_title_1_names_1 add_title_1_names_2 add_title_2_names_1 add_title_2_names_2 after_symbol_1_freetext_1
    after_symbol_1_freetext_2 after_symbol_2_freetext_1 after_symbol_2_freetext_2 append_time_1_times_1
    append_time_1_times_2 append_time_2_times_1 append_time_2_times_2 append_time_3_times_1
    append_time_3_times_2 append_time_4_times_1 append_time_4_times_2 between_symbols_1_freetext_1
    between_symbols_1_freetext_2 between_symbols_2_freetext_1 between_symbols_2_freetext_2 brackets_1_freetext_1
    brackets_1_freetext_2 brackets_2_freetext_1 brackets_2_freetext_2 change_format_1_dates_1
    change_format_1_dates_2 change_format_2_dates_1 change_format_2_dates_2 change_format_3_dates_1
    change_format_3_dates_2 change_format_4_dates_1 change_format_4_dates_2 change_punctuation_1_dates_1
    change_punctuation_1_dates_2 change_punctuation_2_dates_1 change_punctuation_2_dates_2 convert_10_times_1
    convert_10_times_2 convert_1_times_1 convert_1_times_2 convert_1_units_1 convert_1_units_2 convert_2_times_1
    convert_2_times_2 convert_2_units_1 convert_2_units_2 convert_3_times_1 convert_3_times_2 convert_3_units_1
    convert_3_units_2 convert_4_times_1 convert_4_times_2 convert_4_units_1 convert_4_units_2 convert_5_times_1
    convert_5_times_2 convert_6_times_1 convert_6_times_2 convert_7_times_1 convert_7_times_2 convert_8_times_1
    convert_8_times_2 convert_9_times_1 convert_9_times_2 country_prefix_1_phones_1 country_prefix_1_phones_2
    country_prefix_2_phones_1 country_prefix_2_phones_2 country_prefix_3_phones_1 country_prefix_3_phones_2
    country_prefix_7_phones_1 country_prefix_7_phones_2 country_prefix_8_phones_1 country_prefix_8_phones_2
    country_prefix_9_phones_1 country_prefix_9_phones_2 delete_parentheses_1_phones_1
    delete_parentheses_1_phones_2 delete_parentheses_2_phones_1 delete_parentheses_2_phones_2
    delete_punctuation_1_freetext_1 delete_punctuation_1_freetext_2 delete_punctuation_2_freetext_1
    delete_punctuation_2_freetext_2 delete_punctuation_3_freetext_1 delete_punctuation_3_freetext_2
    delete_punctuation_4_freetext_1 delete_punctuation_4_freetext_2 delete_spaces_1_freetext_1
    delete_spaces_1_freetext_2 delete_spaces_2_freetext_1 delete_spaces_2_freetext_2 delete_time_1_times_1
    delete_time_1_times_2 delete_time_2_times_1 delete_time_2_times_2 digit_to_end_1_freetext_1
    digit_to_end_1_freetext_2 digit_to_end_2_freetext_1 digit_to_end_2_freetext_2 first_character_1_freetext_1
    first_character_1_freetext_2 first_character_2_freetext_1 first_character_2_freetext_2 generate_1_emails_1
    generate_1_emails_2 generate_2_emails_1 generate_2_emails_2 generate_3_emails_1 generate_3_emails_2
    get_after_at_1_emails_1 get_after_at_1_emails_2 get_after_at_2_emails_1 get_after_at_2_emails_2
    get_after_at_3_emails_1 get_after_at_3_emails_2 get_after_at_4_emails_1 get_after_at_4_emails_2
    get_after_comma_1_freetext_1 get_after_comma_1_freetext_2 get_after_comma_2_freetext_1
    get_after_comma_2_freetext_2 get_between_commas_1_freetext_1 get_between_commas_1_freetext_2
    get_between_commas_2_freetext_1 get_between_commas_2_freetext_2 get_caps_1_freetext_1 get_caps_1_freetext_2
    get_caps_2_freetext_1 get_caps_2_freetext_2 get_caps_3_freetext_1 get_caps_3_freetext_2 get_day_1_dates_1
    get_day_1_dates_2 get_day_2_dates_1 get_day_2_dates_2 get_day_3_dates_1 get_day_3_dates_2
    get_day_ordinal_1_dates_1 get_day_ordinal_1_dates_2 get_day_ordinal_2_dates_1 get_day_ordinal_2_dates_2
    get_domain_1_emails_1 get_domain_1_emails_2 get_domain_2_emails_1 get_domain_2_emails_2 get_hour_1_times_1
    get_hour_1_times_2 get_hour_2_times_1 get_hour_2_times_2 get_minutes_1_times_1 get_minutes_1_times_2
    get_minutes_2_times_1 get_minutes_2_times_2 get_month_name_1_dates_1 get_month_name_1_dates_2
    get_month_name_2_dates_1 get_month_name_2_dates_2 get_number_1_phones_1 get_number_1_phones_2
    get_number_2_phones_1 get_number_2_phones_2 get_system_1_units_1 get_system_1_units_2 get_system_2_units_1
    get_system_2_units_2 get_time_1_times_1 get_time_1_times_2 get_time_2_times_1 get_time_2_times_2
    get_title_1_names_1 get_title_1_names_2 get_title_2_names_1 get_title_2_names_2 get_units_1_units_1
    get_units_1_units_2 get_units_2_units_1 get_units_2_units_2 get_value_1_units_1 get_value_1_units_2
    get_value_2_units_1 get_value_2_units_2 get_week_day_1_dates_1 get_week_day_1_dates_2 get_week_day_2_dates_1
    get_week_day_2_dates_2 login_1_names_1 login_1_names_2 login_2_names_1 login_2_names_2
    reduce_month_name_1_dates_1 reduce_month_name_1_dates_2 reduce_month_name_2_dates_1
    reduce_month_name_2_dates_2 reduce_name_1_names_1 reduce_name_1_names_2 reduce_name_2_names_1
    reduce_name_2_names_2 reduce_name_3_names_1 reduce_name_3_names_2 reduce_name_4_names_1
    reduce_name_4_names_2 reduce_name_5_names_1 reduce_name_5_names_2 reduce_name_6_names_1
    reduce_name_6_names_2 reduce_name_7_names_1 reduce_name_7_names_2 reduce_name_8_names_1
    reduce_name_8_names_2 reduce_name_9_names_1 reduce_name_9_names_2 set_format_1_dates_1 set_format_1_dates_2
    set_format_2_dates_1 set_format_2_dates_2 set_prefix_1_phones_1 set_prefix_1_phones_2 set_prefix_2_phones_1
    set_prefix_2_phones_2 set_prefix_3_phones_1 set_prefix_3_phones_2 set_prefix_4_phones_1
    set_prefix_4_phones_2 set_prefix_5_phones_1 set_prefix_5_phones_2 set_prefix_6_phones_1
    set_prefix_6_phones_2 set_punctuation_1_phones_1 set_punctuation_1_phones_2 set_punctuation_2_phones_1
    set_punctuation_2_phones_2 some_before_at_na_emails_1 some_before_at_na_emails_2 to_upper_1_freetext_1
    to_upper_1_freetext_2 to_upper_2_freetext_1 to_upper_2_freetext_2
multiemo: all_sentence_de all_sentence_en all_sentence_es all_sentence_fr all_sentence_it all_sentence_ja
    all_sentence_nl all_sentence_pl all_sentence_pt all_sentence_ru all_sentence_zh all_text_de all_text_en
    all_text_es all_text_fr all_text_it all_text_ja all_text_nl all_text_pl all_text_pt all_text_ru all_text_zh
    hotels_sentence_de hotels_sentence_en hotels_sentence_es hotels_sentence_fr hotels_sentence_it
    hotels_sentence_ja hotels_sentence_nl hotels_sentence_pl hotels_sentence_pt hotels_sentence_ru
    hotels_sentence_zh hotels_text_de hotels_text_en hotels_text_es hotels_text_fr hotels_text_it hotels_text_ja
    hotels_text_nl hotels_text_pl hotels_text_pt hotels_text_ru hotels_text_zh medicine_sentence_de
    medicine_sentence_en medicine_sentence_es medicine_sentence_fr medicine_sentence_it medicine_sentence_ja
    medicine_sentence_nl medicine_sentence_pl medicine_sentence_pt medicine_sentence_ru medicine_sentence_zh
    medicine_text_de medicine_text_en medicine_text_es medicine_text_fr medicine_text_it medicine_text_ja
    medicine_text_nl medicine_text_pl medicine_text_pt medicine_text_ru medicine_text_zh products_sentence_de
    products_sentence_en products_sentence_es products_sentence_fr products_sentence_it products_sentence_ja
    products_sentence_nl products_sentence_pl products_sentence_pt products_sentence_ru products_sentence_zh
    products_text_de products_text_en products_text_es products_text_fr products_text_it products_text_ja
    products_text_nl products_text_pl products_text_pt products_text_ru products_text_zh reviews_sentence_de
    reviews_sentence_en reviews_sentence_es reviews_sentence_fr reviews_sentence_it reviews_sentence_ja
    reviews_sentence_nl reviews_sentence_pl reviews_sentence_pt reviews_sentence_ru reviews_sentence_zh
    reviews_text_de reviews_text_en reviews_text_es reviews_text_fr reviews_text_it reviews_text_ja
    reviews_text_nl reviews_text_pl reviews_text_pt reviews_text_ru reviews_text_zh
natural_instructions: subtask001_quoref_question_generation subtask002_quoref_answer_generation
    subtask003_mctaco_question_generation_event_duration subtask004_mctaco_answer_generation_event_duration
    subtask005_mctaco_wrong_answer_generation_event_duration
    subtask006_mctaco_question_generation_transient_stationary
    subtask007_mctaco_answer_generation_transient_stationary
    subtask008_mctaco_wrong_answer_generation_transient_stationary
    subtask009_mctaco_question_generation_event_ordering subtask010_mctaco_answer_generation_event_ordering
    subtask011_mctaco_wrong_answer_generation_event_ordering
    subtask012_mctaco_question_generation_absolute_timepoint
    subtask013_mctaco_answer_generation_absolute_timepoint
    subtask014_mctaco_wrong_answer_generation_absolute_timepoint subtask015_mctaco_question_generation_frequency
    subtask016_mctaco_answer_generation_frequency subtask017_mctaco_wrong_answer_generation_frequency
    subtask018_mctaco_temporal_reasoning_presence subtask019_mctaco_temporal_reasoning_category
    subtask020_mctaco_span_based_question subtask021_mctaco_grammatical_logical
    subtask022_cosmosqa_passage_inappropriate_binary subtask023_cosmosqa_question_generation
    subtask024_cosmosqa_answer_generation subtask025_cosmosqa_incorrect_answer_generation
    subtask026_drop_question_generation subtask027_drop_answer_type_generation subtask028_drop_answer_generation
    subtask029_winogrande_full_object subtask030_winogrande_full_person
    subtask031_winogrande_question_generation_object subtask032_winogrande_question_generation_person
    subtask033_winogrande_answer_generation subtask034_winogrande_question_modification_object
    subtask035_winogrande_question_modification_person subtask036_qasc_topic_word_to_generate_related_fact
    subtask037_qasc_generate_related_fact subtask038_qasc_combined_fact subtask039_qasc_find_overlapping_words
    subtask040_qasc_question_generation subtask041_qasc_answer_generation
    subtask042_qasc_incorrect_option_generation subtask043_essential_terms_answering_incomplete_questions
    subtask044_essential_terms_identifying_essential_words subtask045_miscellaneous_sentence_paraphrasing
    subtask046_miscellaenous_question_typing subtask047_misc_answering_science_questions
    subtask048_multirc_question_generation subtask049_multirc_questions_needed_to_answer
    subtask050_multirc_answerability subtask051_multirc_correct_answer_single_sentence
    subtask052_multirc_identify_bad_question subtask053_multirc_correct_bad_question
    subtask054_multirc_write_correct_answer subtask055_multirc_write_incorrect_answer
    subtask056_multirc_classify_correct_answer subtask057_multirc_classify_incorrect_answer
    subtask058_multirc_question_answering subtask059_ropes_story_generation subtask060_ropes_question_generation
    subtask061_ropes_answer_generation
navigate:
nonsense_words_grammar:
novel_concepts:
object_counting:
odd_one_out:
operators:
paragraph_segmentation:
parsinlu_qa:
parsinlu_reading_comprehension:
penguins_in_a_table:
periodic_elements: subtask_0 subtask_1
persian_idioms:
phrase_relatedness:
physical_intuition:
physics:
physics_questions:
play_dialog_same_or_different:
polish_sequence_labeling:
presuppositions_as_nli:
qa_wikidata:
question_selection:
real_or_fake_text: easy gpt2 gpt2_xl
reasoning_about_colored_objects:
repeat_copy_logic:
rephrase:
riddle_sense:
ruin_names:
salient_translation_error_detection:
scientific_press_release:
semantic_parsing_in_context_sparc:
semantic_parsing_spider:
sentence_ambiguity:
similarities_abstraction:
simp_turing_concept: additional_set_1 additional_set_2 witness_set
simple_arithmetic_json:
simple_arithmetic_json_multiple_choice:
simple_arithmetic_json_subtasks: one_digit three_digit two_digit
simple_arithmetic_multiple_targets_json:
simple_ethical_questions:
simple_text_editing:
snarks:
social_iqa:
social_support:
sports_understanding:
strange_stories: boolean multiple_choice
strategyqa:
sufficient_information:
suicide_risk:
swahili_english_proverbs:
swedish_to_german_proverbs:
symbol_interpretation: adversarial emoji_agnostic name_agnostic plain tricky
temporal_sequences:
tense:
timedial:
topical_chat:
tracking_shuffled_objects: five_objects seven_objects three_objects
understanding_fables:
undo_permutation: reorder_byswap reorder_chars reorder_words
unit_conversion: chained_conversion different_systems novel_systems si_conversion unit_addition_general
    unit_addition_same unit_conversion_with_relative_error unit_identification
unit_interpretation: lv0 lv1 lv2 lv3
unnatural_in_context_learning: dates dates_unnatural_content dates_unnatural_content_and_form
    dates_unnatural_form identity reverse_natural_content reverse_to_natural_content unnatural_addition_2_digit
vitaminc_fact_verification:
what_is_the_tao:
which_wiki_edit:
winowhy:
word_sorting:
word_unscrambling:
"""


@cache
def known_tasks() -> dict[str, tuple[str, ...]]:
    """Task name → its subtasks' names (empty for a task without subtasks)."""
    out: dict[str, list[str]] = {}
    task = ""
    for line in _INDEX.strip().splitlines():
        words = line.split()
        if not line.startswith(" "):
            task = words.pop(0).removesuffix(":")
            out[task] = []
        out[task].extend(words)
    return {name: tuple(subtasks) for name, subtasks in out.items()}


def render(folder: Path) -> str:
    """The `_INDEX` text for an extracted `benchmark_tasks` folder."""
    import textwrap

    lines = []
    for task in sorted(p.name for p in folder.iterdir() if (p / "task.json").is_file()):
        subtasks = sorted(p.name for p in (folder / task).iterdir() if (p / "task.json").is_file())
        text = " ".join([f"{task}:", *subtasks])
        lines += textwrap.wrap(text, 112, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(Path(sys.argv[1])))
