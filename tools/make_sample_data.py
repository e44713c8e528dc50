"""Generate the synthetic sample data shipped in ``src/mellama_train/sample_data``.

Everything written here is made up from the templates and word lists in this file: there is no real patient
data and no copied text. The output is small (well under 3 MB) but large enough for the tests and the tiny CPU
runs to see several thousand packed sequences, and built from few enough sentence patterns that a 2-layer
model's loss should fall visibly within ~100 steps.

    python tools/make_sample_data.py                      # rewrite the shipped sample data
    python tools/make_sample_data.py --out /tmp/sample    # write elsewhere (e.g. to diff)

Re-running reproduces byte-identical files: every source has its own seeded ``random.Random`` (so editing one
source's templates leaves the others unchanged), records are written sorted by id, gzip headers carry mtime=0
and no file name, zstd uses a fixed level, and the tokenizer is trained single-threaded on the train text in a
fixed order. The README next to the data documents the formats and the token counts printed at the end.

``instruct/`` holds synthetic instruction-tuning data (alpaca JSONL, chat JSONL and a parquet file with its own
column names) for Me-LLaMA's task families: QA, NER, relation extraction, classification, summarisation, NLI
and case reasoning. It is written after the tokenizer and never added to its training text, so changing the
instruction templates cannot change the tokenizer or any pretraining file. The parquet file is byte-identical
on re-run with the same pyarrow version (its footer names the version that wrote it).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import io
import json
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
import zstandard

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "mellama_train" / "sample_data"

# Document counts. They were tuned so that each source's train split clears the token floors the
# downstream mixture tests rely on (pubmed >= 300k, mimic >= 60k, redpajama >= 100k tokens with the shipped
# tokenizer) while the whole directory stays under 3 MB on disk.
PUBMED_TRAIN_DOCS = 1800
PUBMED_HELDOUT_DOCS = 100
MIMIC_TRAIN_NOTES = 300
MIMIC_HELDOUT_NOTES = 30
MIMIC_CXR_REPORTS = 40
REDPAJAMA_TRAIN_DOCS = 800
REDPAJAMA_HELDOUT_DOCS = 60
# Instruction data (not pretraining text: it is neither counted above nor seen by the tokenizer).
INSTRUCT_ALPACA_TRAIN = 400
INSTRUCT_ALPACA_HELDOUT = 40
INSTRUCT_CHAT_TRAIN = 150
INSTRUCT_CHAT_HELDOUT = 20
INSTRUCT_QA_PAIRS = 150
# Output lengths in words: most answers are short; the long write-ups fall in this range.
INSTRUCT_LONG_OUTPUT_WORDS = (150, 300)

# One seed per source, so a template edit in one source does not reshuffle the others.
PUBMED_SEED = 1001
MIMIC_SEED = 2002
CXR_SEED = 3003
REDPAJAMA_SEED = 4004
TOKENIZER_SEED = 5005
INSTRUCT_SEED = 6006
CHAT_SEED = 7007
QA_SEED = 8008

TOKENIZER_VOCAB_SIZE = 2048
GZIP_LEVEL = 9
ZSTD_LEVEL = 19
# Generated sub-directories; removed before writing so a renamed file cannot linger. README.md and
# __init__.py in the same directory are hand-written and left alone.
GENERATED_DIRS = ("pubmed", "mimic", "redpajama", "tokenizer", "instruct")


# --------------------------------------------------------------------------------------------------------
# Small helpers shared by the three sources
# --------------------------------------------------------------------------------------------------------


def capitalize_first(text: str) -> str:
    # str.capitalize() would lower-case the rest ("HbA1c" -> "Hba1c"), so only touch the first letter.
    return text[:1].upper() + text[1:]


def fmt_p(rng: random.Random, significant: bool) -> str:
    if significant:
        return rng.choice(["P<0.001", f"P=0.00{rng.randint(1, 9)}", f"P=0.0{rng.randint(10, 49)}"])
    return f"P=0.{rng.randint(6, 94):02d}"


def ratio_with_ci(rng: random.Random, protective: bool) -> tuple[str, str, str]:
    """A point estimate and a 95% CI that agree with each other and with the direction of the effect."""
    point = rng.uniform(0.55, 0.9) if protective else rng.uniform(1.15, 2.6)
    low = point * rng.uniform(0.7, 0.92)
    high = point * rng.uniform(1.06, 1.3)
    if protective:
        high = min(high, 0.98)
    else:
        low = max(low, 1.02)
    return f"{point:.2f}", f"{low:.2f}", f"{high:.2f}"


def ordered_subset(rng: random.Random, items: list[str], count: int) -> list[str]:
    """``count`` of ``items`` picked at random but kept in their written order, so the text still reads."""
    return [items[i] for i in sorted(rng.sample(range(len(items)), count))]


def unique_documents(make: Callable[[], T], count: int, text_of: Callable[[T], str] = str) -> list[T]:
    """Draw ``count`` documents with distinct texts, so a held-out document never equals a train one."""
    seen: set[str] = set()
    documents: list[T] = []
    attempts = 0
    while len(documents) < count:
        attempts += 1
        if attempts > count * 20:
            raise RuntimeError(f"templates too narrow: {len(documents)} distinct documents of {count} wanted")
        document = make()
        if text_of(document) not in seen:
            seen.add(text_of(document))
            documents.append(document)
    return documents


# --------------------------------------------------------------------------------------------------------
# PubMed-like abstracts
# --------------------------------------------------------------------------------------------------------

DISEASES = [
    "type 2 diabetes",
    "hypertension",
    "heart failure with reduced ejection fraction",
    "atrial fibrillation",
    "chronic kidney disease",
    "community-acquired pneumonia",
    "sepsis",
    "asthma",
    "chronic obstructive pulmonary disease",
    "rheumatoid arthritis",
    "major depressive disorder",
    "migraine",
    "osteoporosis",
    "non-alcoholic fatty liver disease",
    "ischemic stroke",
    "acute myocardial infarction",
    "breast cancer",
    "colorectal cancer",
    "non-small cell lung cancer",
    "psoriasis",
    "Crohn's disease",
    "ulcerative colitis",
    "multiple sclerosis",
    "Parkinson's disease",
    "Alzheimer's disease",
    "obesity",
    "gestational diabetes",
    "preeclampsia",
    "pulmonary tuberculosis",
    "chronic hepatitis C",
    "acute kidney injury",
    "venous thromboembolism",
    "systemic lupus erythematosus",
    "open-angle glaucoma",
    "atopic dermatitis",
    "peripheral artery disease",
]

# Drug -> a typical daily dose phrase, so dose and drug stay plausible together.
DRUGS = {
    "metformin": "1000 mg twice daily",
    "empagliflozin": "10 mg once daily",
    "dapagliflozin": "10 mg once daily",
    "semaglutide": "1 mg once weekly",
    "liraglutide": "1.8 mg once daily",
    "lisinopril": "20 mg once daily",
    "losartan": "50 mg once daily",
    "amlodipine": "5 mg once daily",
    "metoprolol succinate": "100 mg once daily",
    "carvedilol": "25 mg twice daily",
    "spironolactone": "25 mg once daily",
    "furosemide": "40 mg once daily",
    "apixaban": "5 mg twice daily",
    "rivaroxaban": "20 mg once daily",
    "warfarin": "dose-adjusted",
    "atorvastatin": "40 mg once daily",
    "rosuvastatin": "20 mg once daily",
    "aspirin": "81 mg once daily",
    "clopidogrel": "75 mg once daily",
    "ticagrelor": "90 mg twice daily",
    "methotrexate": "15 mg once weekly",
    "adalimumab": "40 mg every 2 weeks",
    "infliximab": "5 mg/kg every 8 weeks",
    "tocilizumab": "8 mg/kg every 4 weeks",
    "prednisone": "40 mg once daily",
    "dexamethasone": "6 mg once daily",
    "sertraline": "50 mg once daily",
    "escitalopram": "10 mg once daily",
    "ceftriaxone": "2 g once daily",
    "azithromycin": "500 mg once daily",
    "vancomycin": "15 mg/kg every 12 hours",
    "tenofovir": "300 mg once daily",
    "sofosbuvir": "400 mg once daily",
    "pembrolizumab": "200 mg every 3 weeks",
    "nivolumab": "240 mg every 2 weeks",
    "trastuzumab": "6 mg/kg every 3 weeks",
    "levothyroxine": "50 µg once daily",
    "omeprazole": "20 mg once daily",
    "zoledronic acid": "5 mg once yearly",
    "denosumab": "60 mg every 6 months",
    "vitamin D3": "2000 IU once daily",
}
# Comparator -> how its trial arm is named ("the placebo group").
COMPARATORS = {
    "placebo": "placebo",
    "usual care": "usual care",
    "standard therapy": "standard therapy",
    "no treatment": "untreated",
    "an active comparator": "comparator",
}

GENES = [
    "BRCA1",
    "BRCA2",
    "TP53",
    "EGFR",
    "KRAS",
    "APOE",
    "PCSK9",
    "TNF",
    "IL6",
    "MTHFR",
    "CYP2C19",
    "CYP2D6",
    "SLCO1B1",
    "FTO",
    "TCF7L2",
    "PNPLA3",
    "JAK2",
    "BRAF",
    "NOD2",
    "LRRK2",
    "VEGFA",
    "ACE",
]

# Outcomes are events, so "a lower risk of <outcome>" reads correctly for every one of them.
OUTCOMES = [
    "all-cause mortality",
    "30-day hospital readmission",
    "treatment failure",
    "uncontrolled blood pressure",
    "major adverse cardiovascular events",
    "disease progression",
    "cancer-specific death",
    "prolonged hospital stay",
    "emergency department visits",
    "incident acute kidney injury",
    "delayed clinical recovery",
    "severe exacerbations",
    "vertebral fracture",
    "symptom relapse at 12 weeks",
    "hospitalization for heart failure",
    "recurrent stroke",
    "virologic failure",
    "disease flare",
    "major bleeding",
    "hip fracture",
]
COVARIATES = [
    "body mass index",
    "smoking status",
    "estimated glomerular filtration rate",
    "baseline HbA1c",
    "history of cardiovascular disease",
    "socioeconomic status",
    "Charlson comorbidity index",
]

# Population -> (youngest, oldest) mean age and whether everyone enrolled is a woman, so the "Of the N
# participants" sentence agrees with the population named in the title.
POPULATIONS = {
    "adults": (35, 70, False),
    "older adults": (66, 82, False),
    "children": (4, 11, False),
    "adolescents": (12, 17, False),
    "postmenopausal women": (52, 74, True),
    "pregnant women": (24, 36, True),
    "patients receiving hemodialysis": (50, 72, False),
    "critically ill patients": (48, 75, False),
    "outpatients": (38, 70, False),
    "veterans": (55, 78, False),
    "nursing home residents": (74, 88, False),
    "hospitalized patients": (50, 80, False),
    "young adults": (19, 30, False),
}
DESIGNS = [
    "randomized controlled trial",
    "retrospective cohort study",
    "prospective cohort study",
    "case-control study",
    "cross-sectional study",
    "systematic review and meta-analysis",
    "multicenter randomized trial",
    "nested case-control study",
    "secondary analysis of a randomized trial",
    "population-based cohort study",
    "pilot study",
]
# Each setting carries its own preposition: "at a hospital" but "using a claims database".
SETTINGS = [
    "at a tertiary care hospital",
    "at three academic medical centers",
    "using a national claims database",
    "in 42 primary care practices",
    "in a regional health system",
    "in community hospitals",
    "at a university hospital",
    "within an integrated health care network",
    "in eleven intensive care units",
    "using a national disease registry",
]
GENOTYPING_METHODS = [
    "a custom genotyping array",
    "TaqMan allelic discrimination",
    "whole-exome sequencing",
    "targeted next-generation sequencing",
]

SECTION_LABELS = [
    ("BACKGROUND", "METHODS", "RESULTS", "CONCLUSIONS"),
    ("OBJECTIVE", "METHODS", "RESULTS", "CONCLUSIONS"),
    ("INTRODUCTION", "METHODS", "RESULTS", "CONCLUSION"),
    ("IMPORTANCE", "DESIGN, SETTING, AND PARTICIPANTS", "RESULTS", "CONCLUSIONS AND RELEVANCE"),
    ("BACKGROUND", "METHODS", "FINDINGS", "INTERPRETATION"),
]


def pubmed_abstract(rng: random.Random) -> str:
    disease = rng.choice(DISEASES)
    drug = rng.choice(sorted(DRUGS))
    dose = DRUGS[drug]
    comparator = rng.choice(sorted(COMPARATORS))
    outcome, outcome2, outcome3 = rng.sample(OUTCOMES, 3)
    population = rng.choice(sorted(POPULATIONS))
    youngest, oldest, women_only = POPULATIONS[population]
    gene = rng.choice(GENES)
    # A third of the abstracts are genetic association studies; they use the gene-flavoured templates and
    # only observational designs.
    genetic = rng.random() < 0.33
    design = rng.choice([d for d in DESIGNS if "random" not in d] if genetic else DESIGNS)
    protective = rng.random() < 0.7
    n_total = rng.randint(40, 9000)
    year1 = rng.randint(1998, 2019)
    year2 = year1 + rng.randint(1, 5)
    est, low, high = ratio_with_ci(rng, protective)
    effect = "lower" if protective else "higher"
    measure = rng.choice(["hazard ratio", "odds ratio", "relative risk"])

    if genetic:
        title = rng.choice(
            [
                f"Association between {gene} polymorphisms and {outcome} in {population} with {disease}",
                f"{gene} variants and the risk of {disease}: a {design}",
                f"Genetic variation in {gene} predicts {outcome} among {population} with {disease}",
            ]
        )
    else:
        title = rng.choice(
            [
                f"{capitalize_first(drug)} versus {comparator} for {disease} in {population}: a {design}",
                f"Effect of {drug} on {outcome} in {population} with {disease}",
                f"{capitalize_first(outcome)} after initiation of {drug} among {population} with {disease}",
                f"{capitalize_first(drug)} and {outcome} in {disease}: results of a {design}",
            ]
        )

    background = [
        rng.choice(
            [
                f"{capitalize_first(disease)} is a leading cause of morbidity among {population}, "
                f"and {outcome} remains difficult to predict.",
                f"{capitalize_first(disease)} affects a growing number of {population} worldwide.",
                f"The burden of {disease} among {population} has increased over the past two decades.",
            ]
        )
    ]
    if genetic:
        background.append(
            f"Variants in {gene} have been associated with {disease}, but their relationship with "
            f"{outcome} is not well understood."
        )
    else:
        background.append(
            rng.choice(
                [
                    f"The effect of {drug} on {outcome} in {population} with {disease} remains uncertain.",
                    f"Current guidelines recommend {drug} for {disease}, although evidence in {population} "
                    "is limited.",
                    f"We aimed to evaluate whether {drug} changes {outcome} compared with {comparator}.",
                ]
            )
        )

    methods = [f"We conducted a {design} {rng.choice(SETTINGS)} between {year1} and {year2}."]
    if genetic:
        methods.append(
            f"Genotyping of {gene} was performed in {n_total} participants using "
            f"{rng.choice(GENOTYPING_METHODS)}."
        )
    else:
        methods.append(
            f"A total of {n_total} {population} with {disease} received {drug} ({dose}) or {comparator}."
        )
    methods.append(
        rng.choice(
            [
                f"The primary outcome was {outcome}; secondary outcomes included {outcome2} and {outcome3}.",
                f"The primary end point was {outcome}.",
                f"Participants were followed for a median of {rng.randint(6, 60)} months for {outcome}.",
            ]
        )
    )
    methods.append(
        rng.choice(
            [
                f"Cox proportional hazards models were adjusted for age, sex, and {rng.choice(COVARIATES)}.",
                f"Logistic regression was used to estimate the {measure} adjusted for age, sex, and "
                f"{rng.choice(COVARIATES)}.",
                "Analyses followed the intention-to-treat principle.",
            ]
        )
    )

    n_women = n_total if women_only else rng.randint(n_total // 5, n_total * 4 // 5)
    results = [
        f"Of the {n_total} participants, {n_women} ({100 * n_women / n_total:.1f}%) were women and the mean "
        f"age was {rng.uniform(youngest, oldest):.1f} years."
    ]
    if genetic:
        results.append(
            f"Carriers of the {gene} minor allele had a {effect} risk of {outcome} ({measure} {est}; "
            f"95% CI {low} to {high}; {fmt_p(rng, True)})."
        )
    else:
        results.append(
            f"{capitalize_first(drug)} was associated with a {effect} risk of {outcome} ({measure} {est}; "
            f"95% CI {low} to {high}; {fmt_p(rng, True)})."
        )
    null_point = rng.uniform(0.9, 1.1)
    null_est, null_low = f"{null_point:.2f}", f"{null_point * rng.uniform(0.75, 0.95):.2f}"
    null_high = f"{null_point * rng.uniform(1.05, 1.3):.2f}"
    results.append(
        f"No significant difference in {outcome2} was observed between groups ({measure} {null_est}; "
        f"95% CI {null_low} to {null_high}; {fmt_p(rng, False)})."
    )
    if genetic:
        results.append("The association was consistent across subgroups defined by age and sex.")
    else:
        pct_a, pct_b = rng.uniform(2, 30), rng.uniform(2, 30)
        results.append(
            f"Adverse events occurred in {pct_a:.1f}% of the {drug} group and {pct_b:.1f}% of the "
            f"{COMPARATORS[comparator]} group."
        )

    if genetic:
        conclusion = rng.choice(
            [
                f"These findings support further evaluation of {gene} as a marker of {outcome}.",
                f"Genotyping {gene} may help identify {population} with {disease} at risk of {outcome}.",
            ]
        )
    else:
        conclusion = rng.choice(
            [
                f"In {population} with {disease}, {drug} was associated with a {effect} risk of {outcome} "
                f"compared with {comparator}.",
                f"{capitalize_first(drug)} may be a reasonable option for {population} with {disease}."
                if protective
                else f"{capitalize_first(drug)} should be used with caution in {population} with {disease}.",
            ]
        )
    conclusions = [conclusion, "Larger trials with longer follow-up are needed to confirm these results."]

    # 4-9 sentences in total, at least one per section, each section's sentences in their written order.
    parts = [background, methods, results, conclusions]
    counts = [rng.randint(1, len(part)) for part in parts]
    target = rng.randint(4, 9)
    while sum(counts) > target:
        counts[rng.choice([i for i, count in enumerate(counts) if count > 1])] -= 1
    sections = [ordered_subset(rng, part, count) for part, count in zip(parts, counts, strict=True)]
    labels = rng.choice(SECTION_LABELS)
    if rng.random() < 0.6:
        body = "\n".join(f"{label}: {' '.join(sents)}" for label, sents in zip(labels, sections, strict=True))
    else:
        body = " ".join(" ".join(sents) for sents in sections)
    return f"{capitalize_first(title)}\n\n{body}"


# --------------------------------------------------------------------------------------------------------
# MIMIC-IV-Note style discharge summaries and MIMIC-CXR style radiology reports
# --------------------------------------------------------------------------------------------------------

# Each admission problem carries its own chief complaint, ED findings, treatment and discharge advice, so a
# note reads as one consistent story (which also makes it easier for a tiny model to learn).
PROBLEMS = [
    {
        "dx": "community-acquired pneumonia",
        "cc": "cough and fever",
        "hpi": "productive cough, subjective fevers and pleuritic chest pain",
        "labs": "WBC 14.2 and lactate 2.1",
        "imaging": "CXR showed a right lower lobe consolidation",
        "ed": "ceftriaxone and azithromycin",
        "course": "treated with ceftriaxone and azithromycin with improvement in oxygenation; transitioned to "
        "oral antibiotics to complete a 5 day course",
        "advice": "Please finish the course of antibiotics as prescribed.",
    },
    {
        "dx": "acute on chronic systolic heart failure",
        "cc": "dyspnea on exertion",
        "hpi": "worsening shortness of breath, orthopnea and bilateral leg swelling",
        "labs": "BNP 2400 and creatinine 1.4",
        "imaging": "CXR showed pulmonary vascular congestion and small bilateral effusions",
        "ed": "furosemide 40 mg IV",
        "course": "diuresed with IV furosemide with net negative 6 liters; transitioned to oral torsemide and "
        "discharge weight recorded",
        "advice": "Please weigh yourself every morning and call your doctor if your weight goes up by more "
        "than 3 lbs.",
    },
    {
        "dx": "diabetic ketoacidosis",
        "cc": "nausea and vomiting",
        "hpi": "polyuria, polydipsia, nausea and several episodes of non-bloody emesis",
        "labs": "glucose 512, bicarbonate 11 and anion gap 26",
        "imaging": "CXR was without acute process",
        "ed": "IV fluids and an insulin infusion",
        "course": "treated with an insulin drip and IV fluids until the anion gap closed; transitioned to "
        "subcutaneous insulin with teaching by the diabetes team",
        "advice": "Please check your blood sugar before every meal and at bedtime.",
    },
    {
        "dx": "upper gastrointestinal bleed",
        "cc": "black stools",
        "hpi": "melena and lightheadedness on standing",
        "labs": "hemoglobin 7.1 from a baseline of 11",
        "imaging": "CXR was unremarkable",
        "ed": "two units of packed red blood cells and an IV pantoprazole infusion",
        "course": "EGD showed a clean-based gastric ulcer; hemoglobin remained stable after transfusion and "
        "diet was advanced",
        "advice": "Please avoid NSAIDs such as ibuprofen and naproxen.",
    },
    {
        "dx": "cellulitis of the left lower extremity",
        "cc": "left leg redness",
        "hpi": "spreading erythema, warmth and pain of the left shin",
        "labs": "WBC 12.8",
        "imaging": "lower extremity ultrasound was negative for DVT",
        "ed": "IV vancomycin",
        "course": "erythema receded on IV vancomycin and was transitioned to oral cephalexin",
        "advice": "Please keep your leg elevated and watch for spreading redness.",
    },
    {
        "dx": "atrial fibrillation with rapid ventricular response",
        "cc": "palpitations",
        "hpi": "intermittent palpitations and mild chest tightness",
        "labs": "TSH within normal limits and troponin negative x2",
        "imaging": "ECG showed atrial fibrillation with a rate of 140",
        "ed": "IV diltiazem",
        "course": "rate controlled with oral metoprolol; apixaban was started after discussion of stroke "
        "risk",
        "advice": "Please take apixaban twice a day and do not miss doses.",
    },
    {
        "dx": "acute kidney injury",
        "cc": "decreased urine output",
        "hpi": "poor oral intake, diarrhea and decreased urine output",
        "labs": "creatinine 3.2 from a baseline of 1.0",
        "imaging": "renal ultrasound showed no hydronephrosis",
        "ed": "2 liters of normal saline",
        "course": "creatinine improved to 1.3 with IV fluids; lisinopril was held and can be restarted by the "
        "PCP",
        "advice": "Please do not take lisinopril until your doctor tells you to restart it.",
    },
    {
        "dx": "COPD exacerbation",
        "cc": "shortness of breath",
        "hpi": "increased sputum production and wheezing after an upper respiratory infection",
        "labs": "venous blood gas with pH 7.33 and pCO2 58",
        "imaging": "CXR showed hyperinflation without consolidation",
        "ed": "nebulized albuterol and ipratropium and methylprednisolone 125 mg IV",
        "course": "treated with nebulizers, a 5 day prednisone burst and azithromycin with return to baseline "
        "oxygen requirement",
        "advice": "Please use your inhalers as prescribed and avoid smoking.",
    },
    {
        "dx": "urinary tract infection",
        "cc": "confusion",
        "hpi": "new confusion, dysuria and urinary frequency noted by family",
        "labs": "urinalysis with large leukocyte esterase and WBC 11.5",
        "imaging": "CT head was without acute intracranial process",
        "ed": "ceftriaxone 1 g IV",
        "course": "mental status returned to baseline on ceftriaxone; urine culture grew pan-sensitive E. coli "
        "and antibiotics were narrowed",
        "advice": "Please drink plenty of fluids and finish your antibiotics.",
    },
    {
        "dx": "ischemic stroke",
        "cc": "right sided weakness",
        "hpi": "right arm and leg weakness with slurred speech",
        "labs": "glucose 132 and INR 1.0",
        "imaging": "MRI brain showed an acute infarct in the left internal capsule",
        "ed": "aspirin 325 mg after a stroke code evaluation",
        "course": "evaluated by neurology; started on aspirin and atorvastatin and worked with physical "
        "therapy",
        "advice": "Please continue aspirin and atorvastatin every day.",
    },
    {
        "dx": "small bowel obstruction",
        "cc": "abdominal pain",
        "hpi": "crampy abdominal pain, distension and no bowel movements",
        "labs": "lactate 1.4 and WBC 9.8",
        "imaging": "CT abdomen showed dilated small bowel loops with a transition point",
        "ed": "a nasogastric tube for decompression",
        "course": "managed conservatively with bowel rest and NG decompression; obstruction resolved and diet "
        "was advanced",
        "advice": "Please eat small meals and call if your abdominal pain returns.",
    },
    {
        "dx": "syncope",
        "cc": "fall",
        "hpi": "lightheadedness and a witnessed loss of consciousness",
        "labs": "orthostatic vital signs positive and troponin negative",
        "imaging": "telemetry showed no arrhythmia",
        "ed": "1 liter of IV fluids",
        "course": "attributed to orthostatic hypotension; antihypertensives were reduced and echocardiogram "
        "was normal",
        "advice": "Please stand up slowly and drink enough fluids.",
    },
]

PMH_ITEMS = [
    "hypertension",
    "hyperlipidemia",
    "type 2 diabetes mellitus",
    "coronary artery disease",
    "chronic kidney disease stage 3",
    "COPD",
    "atrial fibrillation",
    "hypothyroidism",
    "depression",
    "GERD",
    "obstructive sleep apnea",
    "osteoarthritis",
    "prior tobacco use",
    "benign prostatic hyperplasia",
    "iron deficiency anemia",
]
HOME_MEDS = [
    "Aspirin 81 mg PO DAILY",
    "Atorvastatin 40 mg PO QPM",
    "Lisinopril 10 mg PO DAILY",
    "MetFORMIN (Glucophage) 500 mg PO BID",
    "Metoprolol Succinate XL 50 mg PO DAILY",
    "Levothyroxine Sodium 75 mcg PO DAILY",
    "Omeprazole 20 mg PO DAILY",
    "Amlodipine 5 mg PO DAILY",
    "Sertraline 50 mg PO DAILY",
    "Tiotropium Bromide 1 CAP IH DAILY",
    "Furosemide 20 mg PO DAILY",
    "Tamsulosin 0.4 mg PO QHS",
    "Ferrous Sulfate 325 mg PO DAILY",
    "Acetaminophen 650 mg PO Q6H:PRN pain",
]
SERVICES = ["MEDICINE", "MEDICINE", "CARDIOLOGY", "NEUROLOGY", "SURGERY"]
ALLERGIES = [
    "No Known Allergies / Adverse Drug Reactions",
    "Penicillins",
    "Sulfa (Sulfonamide Antibiotics)",
    "lisinopril",
    "Codeine",
]
DISPOSITIONS = ["Home", "Home With Service", "Extended Care"]
# MIMIC-III's bracketed placeholders for a removed place or clinician name; {n} is a meaningless number.
MIMIC3_PLACES = ["[**Hospital1 18**]", "[**Hospital3 {n}**]", "[**Location (un) {n}**]"]
MIMIC3_CLINICIANS = [
    "Dr. [**Last Name (STitle) {n}**]",
    "Dr. [**First Name8 (NamePattern2) {n}**] [**Last Name (NamePattern1) {n}**]",
]


def mimic3_date(day: datetime.date) -> str:
    # MIMIC-III's bracketed date placeholder: year-month-day without zero padding.
    return f"[**{day.year}-{day.month}-{day.day}**]"


def discharge_note(rng: random.Random) -> dict[str, str]:
    """The text and times of one discharge summary (ids are assigned by the caller)."""
    # MIMIC shifts every date into the future; charttime is the discharge day and storetime follows it.
    admitted = datetime.date(rng.randint(2110, 2200), rng.randint(1, 12), rng.randint(1, 28))
    discharged = admitted + datetime.timedelta(days=rng.randint(1, 9))
    stored = datetime.datetime.combine(discharged, datetime.time()) + datetime.timedelta(
        days=rng.randint(0, 2), hours=rng.randint(8, 23), minutes=rng.randint(0, 59)
    )
    # Roughly one note in eight uses MIMIC-III bracket placeholders instead of MIMIC-IV's "___".
    text = discharge_summary(rng, rng.random() < 0.12, admitted, discharged)
    return {
        "charttime": f"{discharged.isoformat()} 00:00:00",
        "storetime": stored.strftime("%Y-%m-%d %H:%M:%S"),
        "text": text,
    }


def discharge_summary(
    rng: random.Random, mimic3_style: bool, admitted: datetime.date, discharged: datetime.date
) -> str:
    problem = rng.choice(PROBLEMS)
    sex = rng.choice(["F", "M"])
    title, person, pronoun = ("Ms.", "woman", "She") if sex == "F" else ("Mr.", "man", "He")
    age = rng.randint(24, 88)
    age_phrase = f"{'an' if str(age).startswith('8') else 'a'} {age} year old {person}"
    born = datetime.date(admitted.year - age, rng.randint(1, 12), rng.randint(1, 28))
    follow_up = discharged + datetime.timedelta(days=rng.randint(5, 21))
    pmh = rng.sample(PMH_ITEMS, rng.randint(2, 6))
    meds = sorted(rng.sample(HOME_MEDS, rng.randint(2, 8)))
    days = rng.randint(1, 7)
    service = rng.choice(SERVICES)
    temp = f"{rng.uniform(97.0, 101.8):.1f}"
    vitals = (
        f"T {temp} HR {rng.randint(58, 128)} BP {rng.randint(96, 178)}/{rng.randint(52, 98)} "
        f"RR {rng.randint(12, 26)} SpO2 {rng.randint(88, 100)}% on RA"
    )

    # MIMIC-IV writes "___" for every removed name, date and place. A few notes here use MIMIC-III's
    # bracketed placeholders instead, so readers and cleaners meet both styles in one corpus.
    def place() -> str:
        return rng.choice(MIMIC3_PLACES).format(n=rng.randint(10, 9999)) if mimic3_style else "___"

    def date(day: datetime.date) -> str:
        return mimic3_date(day) if mimic3_style else "___"

    lines = [
        "Name:  ___                     Unit No:   ___",
        " ",
        f"Admission Date:  {date(admitted)}              Discharge Date:   {date(discharged)}",
        " ",
        f"Date of Birth:  {date(born)}             Sex:   {sex}",
        " ",
        f"Service: {service}",
        " ",
        "Allergies: ",
        rng.choice(ALLERGIES),
        " ",
        "Attending: ___.",
        " ",
        "Chief Complaint:",
        problem["cc"],
        " ",
        "Major Surgical or Invasive Procedure:",
        "EGD" if "bleed" in problem["dx"] else "None",
        " ",
        "History of Present Illness:",
        f"{title} ___ is {age_phrase} with a history of {', '.join(pmh[:-1])} and {pmh[-1]} "
        f"who presents with {problem['hpi']} for {days} day{'s' if days > 1 else ''}. {pronoun} was seen at "
        f"{place()} prior to transfer.",
    ]
    if rng.random() < 0.6:
        lines.append(
            f"{pronoun} denies {rng.choice(['headache', 'vision changes', 'hematuria', 'rash'])} and "
            f"{rng.choice(['recent travel', 'sick contacts', 'new medications', 'weight loss'])}."
        )
    lines += [
        " ",
        f"In the ED, initial vitals were: {vitals}. Labs were notable for {problem['labs']}. "
        f"{capitalize_first(problem['imaging'])}. {pronoun} was given {problem['ed']} and admitted to "
        f"{service.lower()} for further management.",
        " ",
        "Past Medical History:",
        *[f"- {item}" for item in pmh],
        " ",
        "Social History:",
        "___",
        "Family History:",
        rng.choice(
            ["Non-contributory.", "Mother with hypertension.", "Father with coronary artery disease."]
        ),
        " ",
    ]
    if rng.random() < 0.5:
        lines += [
            "Physical Exam:",
            "ADMISSION EXAM:",
            f"VS: {vitals}",
            "GENERAL: Alert and oriented, in no acute distress",
            "HEENT: Sclera anicteric, MMM, oropharynx clear",
            f"LUNGS: {rng.choice(['Clear to auscultation bilaterally', 'Crackles at the bases bilaterally'])}",
            "CV: Regular rate and rhythm, no murmurs",
            "ABD: Soft, non-tender, non-distended",
            f"EXT: {rng.choice(['No edema', '1+ pitting edema to the shins', 'Warm and well perfused'])}",
            " ",
        ]
    if rng.random() < 0.5:
        lines += [
            "Pertinent Results:",
            f"___ 07:{rng.randint(10, 59)}AM BLOOD WBC-{rng.uniform(4, 16):.1f} Hgb-{rng.uniform(7, 15):.1f} "
            f"Hct-{rng.uniform(22, 45):.1f} Plt-{rng.randint(110, 420)}",
            f"___ 07:{rng.randint(10, 59)}AM BLOOD Glucose-{rng.randint(70, 320)} UreaN-{rng.randint(8, 60)} "
            f"Creat-{rng.uniform(0.6, 3.4):.1f} Na-{rng.randint(128, 146)} K-{rng.uniform(3.2, 5.4):.1f}",
            " ",
        ]
    lines += [
        "Brief Hospital Course:",
        f"{capitalize_first(age_phrase)} with {pmh[0]} and {pmh[1]} admitted with {problem['dx']}.",
        " ",
        f"# {capitalize_first(problem['dx'])}: {capitalize_first(problem['course'])}.",
    ]
    for item in pmh[: rng.randint(1, len(pmh))]:
        lines.append(f"# {capitalize_first(item)}: Stable; home regimen continued.")
    lines += [
        " ",
        "Medications on Admission:",
        "The Preadmission Medication list is accurate and complete.",
        *[f"{i}. {med} " for i, med in enumerate(meds, start=1)],
        " ",
    ]
    if rng.random() < 0.5:
        lines += [
            "Discharge Medications:",
            *[f"{i}. {med} " for i, med in enumerate(meds, start=1)],
            " ",
        ]
    lines += [
        "Discharge Disposition:",
        rng.choice(DISPOSITIONS),
        " ",
        "Discharge Diagnosis:",
        f"Primary: {problem['dx']}",
        f"Secondary: {', '.join(pmh)}",
        " ",
        "Discharge Condition:",
        "Mental Status: Clear and coherent.",
        "Level of Consciousness: Alert and interactive.",
        f"Activity Status: {rng.choice(['Ambulatory - Independent.', 'Ambulatory - requires assistance.'])}",
        " ",
        "Discharge Instructions:",
        f"Dear {title} ___,",
        " ",
        f"It was a pleasure taking care of you at {place()}. You were admitted because of {problem['dx']}. "
        f"{problem['advice']}",
        " ",
        "Please take all of your medications as prescribed and keep your follow up appointments.",
        " ",
        "We wish you the best!",
        "Your ___ Care Team",
        " ",
        "Followup Instructions:",
    ]
    if mimic3_style:
        clinician = rng.choice(MIMIC3_CLINICIANS).format(n=rng.randint(10, 9999))
        lines.append(f"Please follow up with {clinician} at {place()} on {date(follow_up)}.")
    else:
        lines.append("___")
    return "\n".join(lines) + "\n"


CXR_INDICATIONS = [
    ("with fever and cough", "eval for pneumonia"),
    ("with shortness of breath", "eval for effusion"),
    ("status post line placement", "eval line position"),
    ("with chest pain", "eval for acute process"),
    ("with leg swelling and dyspnea", "eval for fluid overload"),
]
CXR_FINDINGS = [
    "The lungs are clear without focal consolidation, pleural effusion or pneumothorax.",
    "There is a new right lower lobe opacity concerning for pneumonia.",
    "Small bilateral pleural effusions are present with adjacent atelectasis.",
    "There is mild pulmonary vascular congestion without frank edema.",
    "The cardiomediastinal silhouette is within normal limits.",
    "The heart size is mildly enlarged, unchanged from prior.",
    "A right internal jugular central venous catheter terminates in the mid SVC.",
    "No displaced rib fractures are seen.",
    "Degenerative changes are noted in the thoracic spine.",
]
CXR_IMPRESSIONS = {
    0: "No acute cardiopulmonary process.",
    1: "Right lower lobe pneumonia.",
    2: "Small bilateral pleural effusions.",
    3: "Mild pulmonary vascular congestion.",
    6: "Right internal jugular catheter in appropriate position. No pneumothorax.",
}


def cxr_report(rng: random.Random) -> str:
    indication, question = rng.choice(CXR_INDICATIONS)
    portable = rng.random() < 0.4
    key = rng.choice(sorted(CXR_IMPRESSIONS))
    findings = [CXR_FINDINGS[key]] + rng.sample([f for i, f in enumerate(CXR_FINDINGS) if i != key], 2)
    sex = rng.choice(["woman", "man"])
    return (
        "\n".join(
            [
                "                                 FINAL REPORT",
                f" EXAMINATION:  CHEST ({'PORTABLE AP' if portable else 'PA AND LAT'})",
                " ",
                f" INDICATION:  ___ year old {sex} {indication}  // {question}",
                " ",
                f" TECHNIQUE:  {'Single frontal view of the chest' if portable else 'Chest PA and lateral'}",
                " ",
                f" COMPARISON:  {rng.choice(['None.', '___', 'Chest radiograph from ___.'])}",
                " ",
                " FINDINGS: ",
                " ",
                " " + " ".join(findings),
                " ",
                " IMPRESSION: ",
                " ",
                " " + CXR_IMPRESSIONS[key],
            ]
        )
        + "\n"
    )


# --------------------------------------------------------------------------------------------------------
# RedPajama-like general text
# --------------------------------------------------------------------------------------------------------

# Place, team and town names are invented from syllables so no sentence states a fact about a real place.
NAME_STARTS = [
    "Mar",
    "East",
    "Wil",
    "Ash",
    "Bel",
    "Cor",
    "Dun",
    "Fair",
    "Glen",
    "Hol",
    "Lin",
    "Nor",
    "Red",
    "Sil",
]
NAME_ENDS = [
    "brook",
    "ford",
    "haven",
    "mere",
    "ton",
    "vale",
    "wick",
    "field",
    "port",
    "stead",
    "moor",
    "dale",
]
REGIONS = ["the northern highlands", "the southern coast", "the central plains", "the eastern valleys"]
FEATURES = [
    "old stone bridge",
    "weekly market",
    "harbor festival",
    "botanical garden",
    "river walk",
    "clock tower",
]
INDUSTRIES = ["fishing", "farming", "textiles", "tourism", "timber", "shipbuilding", "software"]
SPORTS = [("football", "goals"), ("basketball", "points"), ("hockey", "goals"), ("rugby", "points")]
DISHES = [
    ("tomato soup", ["tomatoes", "onion", "garlic", "olive oil", "vegetable stock", "basil"]),
    ("banana bread", ["ripe bananas", "flour", "butter", "sugar", "eggs", "baking soda"]),
    ("vegetable curry", ["potatoes", "carrots", "onion", "curry paste", "coconut milk", "rice"]),
    ("lemon pancakes", ["flour", "milk", "eggs", "lemon zest", "sugar", "butter"]),
    ("roasted chickpeas", ["chickpeas", "olive oil", "paprika", "salt", "cumin"]),
    ("café-style omelette", ["eggs", "butter", "chives", "crème fraîche", "salt", "pepper"]),
    ("jalapeño cornbread", ["cornmeal", "flour", "jalapeño peppers", "milk", "eggs", "cheddar"]),
]
DEVICES = ["wireless router", "laptop", "smartphone", "smart thermostat", "printer", "e-reader"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SEASONS = ["spring", "summer", "autumn", "winter"]
ORDINALS = ["first", "second", "third", "fourth", "fifth"]


def invented_name(rng: random.Random) -> str:
    return rng.choice(NAME_STARTS) + rng.choice(NAME_ENDS)


def some_sentences(rng: random.Random, sentences: list[str], at_least: int) -> str:
    """A paragraph of ``at_least`` or more of its template sentences, always opening with the first one.

    The first sentence introduces the paragraph's subject ("Wilstead is a small town ..."), so the sentences
    after it can refer back to it.
    """
    rest = ordered_subset(rng, sentences[1:], rng.randint(at_least - 1, len(sentences) - 1))
    return " ".join([sentences[0], *rest])


def town_article(rng: random.Random) -> list[str]:
    """Encyclopedic / travel text about one invented town."""
    town, neighbour = invented_name(rng), invented_name(rng)
    feature, industry, newer_industry = rng.choice(FEATURES), *rng.sample(INDUSTRIES, 2)
    founded = rng.randint(1420, 1850)
    overview = [
        f"{town} is a small {rng.choice(['coastal', 'market', 'mountain', 'river'])} town in "
        f"{rng.choice(REGIONS)}, known for its {feature}.",
        f"The town had a population of about {rng.randint(2, 95) * 100} at the last census.",
        f"The climate is mild, with average summer temperatures of {rng.randint(18, 29)}°C and cool, wet "
        "winters.",
        f"{town} lies about {rng.randint(5, 140)} kilometres from the nearest city and is linked to it by "
        f"{rng.choice(['a regional railway', 'a coastal road', 'a daily ferry', 'a bus line'])}.",
    ]
    history = [
        f"The {town} Charter was signed in {founded} after a long dispute over trade on the river.",
        f"It gave the merchants of {town} the right to hold a market every {rng.choice(WEEKDAYS)}.",
        f"In {founded + rng.randint(3, 40)}, a fire destroyed much of the old quarter, and the town was rebuilt "
        "in stone.",
        f"Relations with neighbouring {neighbour} improved after a bridge was completed in "
        f"{founded + rng.randint(41, 90)}.",
        "Historians still debate how much the charter changed daily life for ordinary families.",
    ]
    economy = [
        f"The economy of {town} was historically based on {industry}.",
        f"Since the {rng.choice(['1950s', '1970s', '1990s'])}, {newer_industry} has grown and now employs "
        f"about {rng.randint(10, 60)} percent of working residents.",
        f"Many families still keep a link to {industry}, and the {feature} is busiest on market days.",
    ]
    travel = [
        f"Travellers heading to {town} should plan to arrive early in the day.",
        f"The best time to visit is {rng.choice(SEASONS)}, when the weather is pleasant and the streets are "
        "quiet.",
        f"A ticket for the local train costs about {rng.randint(2, 30)} dollars and trains run every "
        f"{rng.choice([10, 15, 20, 30])} minutes.",
        f"Do not miss the {feature}, which is free to visit.",
        "Pack comfortable shoes, because most of the old town is best seen on foot.",
        "Small cafés near the main square serve simple food at fair prices.",
    ]
    later = [history, economy, travel]
    rng.shuffle(later)
    return [some_sentences(rng, overview, 2)] + [
        some_sentences(rng, p, 2) for p in later[: rng.randint(1, 3)]
    ]


def recipe(rng: random.Random) -> list[str]:
    """How-to text: one dish from the ingredient list to the fridge."""
    dish, ingredients = rng.choice(DISHES)
    shown = ingredients[: rng.randint(3, len(ingredients))]
    heading = f"How to make {dish}"
    intro = [
        f"{capitalize_first(dish)} is a simple dish that takes less than an hour from start to finish.",
        f"It is a good choice for a {rng.choice(WEEKDAYS)} dinner or a weekend lunch.",
        f"This version serves {rng.randint(2, 8)} people.",
    ]
    ingredients_paragraph = [
        f"You will need {', '.join(shown[:-1])} and {shown[-1]}.",
        f"Use the freshest {shown[0]} you can find, because it carries most of the flavour.",
        "Measure everything before you start so nothing is forgotten.",
    ]
    method = [
        f"Start by preheating the oven to {rng.choice([160, 180, 200, 220])}°C if you plan to bake.",
        f"Prepare the {shown[0]} first, then add the {shown[1]} and mix well.",
        f"Stir in the {shown[2]} and cook for about {rng.randint(10, 55)} minutes, stirring from time to time.",
        "Taste and adjust the seasoning before serving.",
    ]
    storage = [
        f"The {dish} keeps for {rng.randint(2, 5)} days in the fridge in a covered container.",
        "Warm it gently before serving.",
        f"It also freezes well for up to {rng.randint(1, 3)} months.",
    ]
    paragraphs = [some_sentences(rng, intro, 2), some_sentences(rng, ingredients_paragraph, 2)]
    paragraphs.append(some_sentences(rng, method, 2))
    if rng.random() < 0.6:
        paragraphs.append(some_sentences(rng, storage, 1))
    if rng.random() < 0.5:
        paragraphs.insert(0, heading)
    return paragraphs


def match_report(rng: random.Random) -> list[str]:
    """News text: one game between two invented teams."""
    sport, unit = rng.choice(SPORTS)
    home, away = f"{invented_name(rng)} Rovers", f"{invented_name(rng)} United"
    winner_score = rng.randint(2, 40)
    loser_score = rng.randint(0, winner_score - 1)
    first_half = rng.randint(1, winner_score)
    result = [
        f"The {home} beat the {away} {winner_score}-{loser_score} in {sport} on {rng.choice(WEEKDAYS)} night.",
        f"A crowd of {rng.randint(2, 60) * 1000} watched the match, the largest of the season.",
    ]
    game = [
        f"The {home} took the lead early and scored {first_half} {unit} in the first half.",
        f"The {away} came back after the break but could not close the gap.",
        f"A late {rng.choice(['save', 'tackle', 'block', 'interception'])} settled the game in the final "
        "minutes.",
    ]
    reaction = [
        f"The {away} coach said the team had played well in defence but missed too many chances.",
        f"The {home} captain praised the supporters and said the team would keep improving.",
    ]
    table = [
        f"The win moves the {home} to {rng.choice(ORDINALS)} place in the table.",
        f"The two teams meet again in {rng.choice(SEASONS)}.",
    ]
    paragraphs = [some_sentences(rng, result, 2), some_sentences(rng, game, 2)]
    paragraphs += [some_sentences(rng, p, 1) for p in (reaction, table) if rng.random() < 0.8]
    return paragraphs


def tech_help(rng: random.Random) -> list[str]:
    """How-to text: fixing one household device."""
    device = rng.choice(DEVICES)
    intro = [
        f"If your {device} stops responding, a restart often solves the problem.",
        f"Many problems with a {device} are caused by a weak connection or a full storage drive.",
    ]
    restart = [
        f"Hold the power button for {rng.randint(5, 30)} seconds until the light turns off.",
        f"Wait {rng.randint(10, 60)} seconds, then switch the {device} back on.",
        "Check whether the problem is still there.",
    ]
    update = [
        f"Next, check that the {device} has the latest software update installed.",
        "Updates often fix known faults and improve security.",
        f"The update usually takes about {rng.randint(3, 20)} minutes.",
    ]
    reset = [
        "If the problem continues, reset the settings to the factory defaults.",
        "Write down your settings first, because a reset removes them.",
        "Contact the manufacturer if none of these steps help.",
    ]
    optional = [p for p in (update, reset) if rng.random() < 0.8]
    return [some_sentences(rng, p, 2) for p in (intro, restart, *optional)]


# Weighted by how often each style appears: encyclopedic text is the largest part of the general domain.
DOCUMENT_STYLES = [town_article, town_article, recipe, match_report, tech_help]


def general_document(rng: random.Random) -> str:
    return "\n\n".join(rng.choice(DOCUMENT_STYLES)(rng))


# --------------------------------------------------------------------------------------------------------
# Instruction data: Me-LLaMA's instruction-tuning tasks
# --------------------------------------------------------------------------------------------------------

# Every answer below is computed from the facts that were put into the prompt (the NER answer is exactly the
# entities inserted into the sentence, the triage label follows fixed vital-sign thresholds, the diagnosis
# follows the PROBLEMS entry the case was drawn from), so a small model can learn the mapping. The words come
# from the pretraining vocabularies above, which the shipped tokenizer already covers; instruction text is
# NOT part of the tokenizer's training text, so adding instruction data leaves the tokenizer unchanged.

INSTRUCT_SYSTEM_PROMPTS = [
    "You are a careful clinical assistant. Answer briefly and only from the information given.",
    "You are a medical AI assistant that helps clinicians read notes and papers. Be concise.",
    "You are a helpful assistant for medical questions. Keep answers short and grounded in the text.",
]
# Abbreviations used in the synthetic notes, reports and abstracts, with their expansions.
ABBREVIATIONS = {
    "BNP": "B-type natriuretic peptide",
    "CXR": "chest X-ray",
    "DVT": "deep vein thrombosis",
    "ECG": "electrocardiogram",
    "EGD": "esophagogastroduodenoscopy",
    "INR": "international normalized ratio",
    "MRI": "magnetic resonance imaging",
    "NSAIDs": "non-steroidal anti-inflammatory drugs",
    "PCP": "primary care provider",
    "TSH": "thyroid-stimulating hormone",
    "WBC": "white blood cell count",
    "COPD": "chronic obstructive pulmonary disease",
    "GERD": "gastroesophageal reflux disease",
    "SpO2": "peripheral oxygen saturation",
    "BID": "twice a day",
    "QHS": "at bedtime",
    "PRN": "as needed",
    "PO": "by mouth",
    "IV": "intravenous",
    "ED": "emergency department",
    "SVC": "superior vena cava",
    "HbA1c": "glycated hemoglobin",
}
# Reasons a drug was stopped: a sentence with one of these states no drug-treats-disease relation.
SIDE_EFFECTS = ["a rash", "nausea", "dizziness", "a dry cough", "low blood pressure", "muscle aches"]
# CXR_FINDINGS that point to no particular impression; a findings paragraph pads its key finding with these,
# so the impression it should get is never ambiguous.
CXR_NEUTRAL_FINDINGS = [4, 5, 7, 8]
NOTE_SECTIONS = [
    "Chief Complaint",
    "History of Present Illness",
    "Past Medical History",
    "Brief Hospital Course",
    "Medications on Admission",
    "Discharge Diagnosis",
    "Discharge Instructions",
]
LETTERS = "ABCD"
# ED treatments too alike to stand as options in one question (a fluid bolus next to a fluid bolus).
ED_LOOKALIKES = [
    {"2 liters of normal saline", "1 liter of IV fluids", "IV fluids and an insulin infusion"},
    {"ceftriaxone and azithromycin", "ceftriaxone 1 g IV"},
]


def join_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c' (no Oxford comma, like the notes)."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def word_count(text: str) -> int:
    return len(text.split())


def long_output(text: str) -> str:
    """``text``, after checking that a long write-up really is 150-300 words."""
    shortest, longest = INSTRUCT_LONG_OUTPUT_WORDS
    if not shortest <= word_count(text) <= longest:
        raise RuntimeError(
            f"long output of {word_count(text)} words, not {shortest}-{longest}: {text[:60]!r}"
        )
    return text


def clinical_case(rng: random.Random) -> dict:
    """One patient drawn from PROBLEMS, with the sentences the case-based tasks put together."""
    problem = rng.choice(PROBLEMS)
    person, pronoun = rng.choice([("woman", "She"), ("man", "He")])
    age = rng.randint(24, 88)
    age_phrase = f"{'an' if str(age).startswith('8') else 'a'} {age} year old {person}"
    pmh = rng.sample(PMH_ITEMS, rng.randint(1, 3))
    days = rng.randint(1, 7)
    vitals = (
        f"T {rng.uniform(97.0, 101.8):.1f} HR {rng.randint(58, 128)} BP {rng.randint(96, 178)}/"
        f"{rng.randint(52, 98)} RR {rng.randint(12, 26)} SpO2 {rng.randint(88, 100)}% on RA"
    )
    presentation = (
        f"{capitalize_first(age_phrase)} with a history of {join_words(pmh)} presents with {problem['hpi']} "
        f"for {days} day{'s' if days > 1 else ''}."
    )
    workup = f"Labs are notable for {problem['labs']}. {capitalize_first(problem['imaging'])}."
    return {
        "problem": problem,
        "age": age,
        "person": person,
        "pronoun": pronoun,
        "age_phrase": age_phrase,
        "pmh": pmh,
        "days": days,
        "vitals": vitals,
        "presentation": presentation,
        "workup": workup,
        "text": f"{presentation} Vitals are {vitals}. {workup}"
        if rng.random() < 0.3
        else f"{presentation} {workup}",
    }


def case_rationale(case: dict) -> str:
    problem = case["problem"]
    return f"{capitalize_first(problem['hpi'])} with {problem['labs']} support this diagnosis."


def multiple_choice(rng: random.Random, correct: str, others: list[str]) -> tuple[str, str]:
    """Four options (the correct one and three distinct distractors) and the letter of the correct one."""
    options = [correct, *rng.sample(sorted(set(others) - {correct}), 3)]
    rng.shuffle(options)
    lines = "\n".join(f"{letter}. {capitalize_first(option)}" for letter, option in zip(LETTERS, options))
    return lines, LETTERS[options.index(correct)]


def trial_abstract(rng: random.Random) -> dict:
    """A short drug-trial abstract and the facts it states; ``finding`` is yes (lower risk), no (higher
    risk) or maybe (no significant difference) for 'does the drug lower the risk of the outcome?'."""
    disease = rng.choice(DISEASES)
    drug = rng.choice(sorted(DRUGS))
    comparator = rng.choice(sorted(COMPARATORS))
    outcome = rng.choice(OUTCOMES)
    population = rng.choice(sorted(POPULATIONS))
    design = rng.choice(DESIGNS)
    finding = rng.choice(["yes", "yes", "no", "maybe"])
    measure = rng.choice(["hazard ratio", "odds ratio", "relative risk"])
    n_total = rng.randint(80, 9000)
    if finding == "maybe":
        # A null result: the interval always contains 1.
        point = rng.uniform(0.9, 1.1)
        low = min(point * rng.uniform(0.75, 0.95), 0.97)
        high = max(point * rng.uniform(1.05, 1.3), 1.03)
        est, low, high = f"{point:.2f}", f"{low:.2f}", f"{high:.2f}"
        p_value = fmt_p(rng, False)
        result = (
            f"The risk of {outcome} did not differ significantly between groups ({measure} {est}; 95% CI {low} "
            f"to {high}; {p_value})."
        )
    else:
        est, low, high = ratio_with_ci(rng, protective=finding == "yes")
        p_value = fmt_p(rng, True)
        effect = "lower" if finding == "yes" else "higher"
        result = (
            f"{capitalize_first(drug)} was associated with a {effect} risk of {outcome} ({measure} {est}; "
            f"95% CI {low} to {high}; {p_value})."
        )
    title = f"{capitalize_first(drug)} versus {comparator} for {disease}"
    sentences = [
        f"We conducted a {design} {rng.choice(SETTINGS)} of {n_total} {population} with {disease} who "
        f"received {drug} ({DRUGS[drug]}) or {comparator}.",
        f"The primary outcome was {outcome}.",
        result,
    ]
    return {
        "disease": disease,
        "drug": drug,
        "comparator": comparator,
        "outcome": outcome,
        "population": population,
        "design": design,
        "finding": finding,
        "measure": measure,
        "n_total": n_total,
        "est": est,
        "low": low,
        "high": high,
        "p_value": p_value,
        "text": f"{title}\n\n{' '.join(sentences)}",
    }


def trial_summary(facts: dict) -> str:
    lead = f"In {facts['population']} with {facts['disease']}, {facts['drug']}"
    if facts["finding"] == "maybe":
        return f"{lead} did not significantly change the risk of {facts['outcome']} compared with {facts['comparator']}."
    effect = "lower" if facts["finding"] == "yes" else "higher"
    return (
        f"{lead} was associated with a {effect} risk of {facts['outcome']} than {facts['comparator']} "
        f"({facts['measure']} {facts['est']})."
    )


def trial_verdict(facts: dict) -> str:
    interval = f"{facts['measure']} {facts['est']}, 95% CI {facts['low']} to {facts['high']}"
    if facts["finding"] == "yes":
        return f"Yes. {capitalize_first(facts['drug'])} lowered the risk of {facts['outcome']} ({interval})."
    if facts["finding"] == "no":
        return f"No. {capitalize_first(facts['drug'])} was associated with a higher risk of {facts['outcome']} ({interval})."
    return f"Maybe. The 95% CI of {facts['low']} to {facts['high']} includes 1, so no difference was shown."


# Question answering: (question, context, answer) triples. The alpaca tasks wrap them in an instruction;
# qa_pairs.parquet stores them as they are. An empty context is a knowledge question.


def qa_diagnosis_choice(rng: random.Random) -> tuple[str, str, str]:
    case = clinical_case(rng)
    dx = case["problem"]["dx"]
    options, letter = multiple_choice(rng, dx, [p["dx"] for p in PROBLEMS])
    question = f"Which of the following is the most likely diagnosis?\n{options}"
    return question, case["text"], f"{letter}. {capitalize_first(dx)}. {case_rationale(case)}"


def qa_treatment_choice(rng: random.Random) -> tuple[str, str, str]:
    case = clinical_case(rng)
    ed = case["problem"]["ed"]
    lookalikes = set().union(*(group for group in ED_LOOKALIKES if ed in group))
    options, letter = multiple_choice(rng, ed, [p["ed"] for p in PROBLEMS if p["ed"] not in lookalikes])
    question = f"Which initial treatment in the emergency department is most appropriate?\n{options}"
    answer = f"{letter}. {capitalize_first(ed)}, the usual first step for {case['problem']['dx']}."
    return question, case["text"], answer


def qa_pubmed(rng: random.Random) -> tuple[str, str, str]:
    facts = trial_abstract(rng)
    question = (
        f"Does {facts['drug']} lower the risk of {facts['outcome']} in {facts['population']} with "
        f"{facts['disease']}? Answer yes, no or maybe."
    )
    return question, facts["text"], trial_verdict(facts)


def qa_case_diagnosis(rng: random.Random) -> tuple[str, str, str]:
    case = clinical_case(rng)
    question = rng.choice(
        ["What is the most likely diagnosis?", "What is the most likely cause of this presentation?"]
    )
    answer = f"The most likely diagnosis is {case['problem']['dx']}. {case_rationale(case)}"
    return question, case["text"], answer


def qa_knowledge(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        drug = rng.choice(sorted(DRUGS))
        return f"What is a typical dose of {drug}?", "", f"A typical dose of {drug} is {DRUGS[drug]}."
    abbreviation = rng.choice(sorted(ABBREVIATIONS))
    return (
        f"What does {abbreviation} stand for in a clinical note?",
        "",
        f"In clinical notes, {abbreviation} stands for {ABBREVIATIONS[abbreviation]}.",
    )


QA_TASKS = [qa_diagnosis_choice, qa_treatment_choice, qa_pubmed, qa_pubmed, qa_case_diagnosis, qa_knowledge]


def qa_pair(rng: random.Random) -> dict[str, str]:
    question, context, answer = rng.choice(QA_TASKS)(rng)
    return {"question": question, "context": context, "answer": answer}


# Alpaca tasks: each returns (instruction, input, output).


def task_medqa(rng: random.Random) -> tuple[str, str, str]:
    question, context, answer = rng.choice([qa_diagnosis_choice, qa_treatment_choice])(rng)
    instruction = rng.choice(
        [
            "Answer the multiple-choice question about the clinical case. Give the letter and the option.",
            "Read the case and choose the best answer (A, B, C or D).",
        ]
    )
    return instruction, f"{context}\n\nQuestion: {question}", answer


def task_pubmedqa(rng: random.Random) -> tuple[str, str, str]:
    question, context, answer = qa_pubmed(rng)
    instruction = rng.choice(
        [
            "Answer the research question with yes, no or maybe based on the abstract, and give a short reason.",
            "Based on the abstract, answer the question (yes / no / maybe) and explain in one sentence.",
        ]
    )
    return (
        instruction,
        f"Question: {question.removesuffix(' Answer yes, no or maybe.')}\nContext: {context}",
        answer,
    )


def ner_sentence(rng: random.Random) -> tuple[str, list[str], list[str]]:
    drugs = rng.sample(sorted(DRUGS), rng.randint(1, 3))
    diseases = rng.sample(DISEASES, rng.randint(1, 2))
    case_age = rng.randint(24, 88)
    age_phrase = f"{'An' if str(case_age).startswith('8') else 'A'} {case_age} year old patient"
    was = "were" if len(drugs) > 1 else "was"
    sentence = rng.choice(
        [
            f"{age_phrase} with {join_words(diseases)} was started on {join_words(drugs)}.",
            f"Patients with {join_words(diseases)} who received {join_words(drugs)} were followed for "
            f"{rng.randint(6, 60)} months.",
            f"After the diagnosis of {join_words(diseases)}, {join_words(drugs)} {was} prescribed.",
            f"In {rng.choice(sorted(POPULATIONS))} with {join_words(diseases)}, {join_words(drugs)} {was} "
            "well tolerated.",
        ]
    )
    return sentence, drugs, diseases


def task_ner(rng: random.Random) -> tuple[str, str, str]:
    sentence, drugs, diseases = ner_sentence(rng)
    kind = rng.choice(["both", "both", "drugs", "diseases"])
    if kind == "drugs":
        return (
            "List every drug mentioned in the sentence, in the order they appear.",
            sentence,
            f"Drugs: {', '.join(drugs)}",
        )
    if kind == "diseases":
        return (
            "List every disease mentioned in the sentence, in the order they appear.",
            sentence,
            f"Diseases: {', '.join(diseases)}",
        )
    instruction = rng.choice(
        [
            "Extract the drug and disease entities from the sentence.",
            "Named entity recognition: list the drugs and the diseases mentioned in the text.",
        ]
    )
    return instruction, sentence, f"Drugs: {', '.join(drugs)}\nDiseases: {', '.join(diseases)}"


def relation_sentence(rng: random.Random) -> dict:
    """A sentence with 0-2 drug-treats-disease pairs plus one drug and one disease that are not a pair."""
    count = rng.choice([0, 1, 1, 2, 2])
    drugs = rng.sample(sorted(DRUGS), count + 1)
    diseases = rng.sample(DISEASES, count + 1)
    pairs = list(zip(drugs[:count], diseases[:count]))
    clauses = [
        rng.choice(
            [
                f"{drug} was started for {disease}",
                f"{disease} was treated with {drug}",
                f"{drug} was given for {disease}",
            ]
        )
        for drug, disease in pairs
    ]
    # The extra drug and disease stand in the sentence without a treats relation between them.
    other_drug, other_disease = drugs[count], diseases[count]
    side_effect = rng.choice([*SIDE_EFFECTS, ""])
    if side_effect:
        clauses.append(f"{other_drug} was stopped because of {side_effect}")
        fate = f"Yes, {other_drug} was stopped because of {side_effect}."
    else:
        clauses.append(f"{other_drug} was continued unchanged")
        fate = f"No drug was stopped; {other_drug} was continued unchanged."
    rng.shuffle(clauses)
    text = f"In a patient with a history of {other_disease}, {'; '.join(clauses)}."
    return {
        "text": text,
        "pairs": sorted(pairs, key=lambda pair: text.index(pair[0])),
        "drugs": sorted(drugs, key=text.index),
        "fate": fate,
    }


def relation_answer(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return "No drug-treats-disease relation is stated in the text."
    return "; ".join(f"({drug}, treats, {disease})" for drug, disease in pairs)


def task_relation(rng: random.Random) -> tuple[str, str, str]:
    sentence = relation_sentence(rng)
    instruction = rng.choice(
        [
            "Extract every drug-treats-disease relation from the text as (drug, treats, disease).",
            "Relation extraction: which drug is given for which disease? Answer as (drug, treats, disease) "
            "triples, or say that there is none.",
        ]
    )
    return instruction, sentence["text"], relation_answer(sentence["pairs"])


def task_note_section(rng: random.Random) -> tuple[str, str, str]:
    case = clinical_case(rng)
    problem = case["problem"]
    section = rng.choice(NOTE_SECTIONS)
    excerpt = {
        "Chief Complaint": problem["cc"],
        "History of Present Illness": f"{case['presentation']} {case['pronoun']} was seen at ___ prior to transfer.",
        "Past Medical History": "\n".join(f"- {item}" for item in case["pmh"]),
        "Brief Hospital Course": f"# {capitalize_first(problem['dx'])}: {capitalize_first(problem['course'])}.",
        "Medications on Admission": "\n".join(
            f"{i}. {med}" for i, med in enumerate(sorted(rng.sample(HOME_MEDS, rng.randint(2, 5))), start=1)
        ),
        "Discharge Diagnosis": f"Primary: {problem['dx']}\nSecondary: {', '.join(case['pmh'])}",
        "Discharge Instructions": f"You were admitted because of {problem['dx']}. {problem['advice']}",
    }[section]
    instruction = rng.choice(
        [
            "Which section of a discharge summary does this excerpt come from?",
            "Classify the discharge summary excerpt by its note section.",
        ]
    )
    return instruction, excerpt, f"The excerpt belongs to the {section} section."


def triage_vitals(rng: random.Random) -> dict[str, float]:
    vitals = {
        "T": round(rng.uniform(97.0, 99.5), 1),
        "HR": rng.randint(58, 98),
        "SBP": rng.randint(100, 160),
        "DBP": rng.randint(60, 92),
        "RR": rng.randint(12, 20),
        "SpO2": rng.randint(94, 100),
    }
    target = rng.choice(["emergent", "urgent", "non-urgent"])
    if target == "emergent":
        for name in rng.sample(["SpO2", "SBP", "HR", "RR"], rng.randint(1, 2)):
            vitals[name] = {
                "SpO2": rng.randint(80, 89),
                "SBP": rng.randint(70, 89),
                "HR": rng.randint(131, 160),
                "RR": rng.randint(29, 36),
            }[name]
    elif target == "urgent":
        for name in rng.sample(["T", "HR", "SBP"], rng.randint(1, 2)):
            vitals[name] = {
                "T": round(rng.uniform(100.4, 103.5), 1),
                "HR": rng.randint(101, 130),
                "SBP": rng.randint(181, 210),
            }[name]
    if vitals["SBP"] < 90:
        vitals["DBP"] = rng.randint(40, 58)
    return vitals


def triage_label(vitals: dict[str, float]) -> str:
    """The fixed rule: any emergent threshold makes it emergent, else any urgent one urgent."""
    emergent = [
        f"the SpO2 of {vitals['SpO2']}% is below 90%" if vitals["SpO2"] < 90 else "",
        f"the systolic blood pressure of {vitals['SBP']} is below 90" if vitals["SBP"] < 90 else "",
        f"the heart rate of {vitals['HR']} is above 130" if vitals["HR"] > 130 else "",
        f"the respiratory rate of {vitals['RR']} is above 28" if vitals["RR"] > 28 else "",
    ]
    urgent = [
        f"the temperature of {vitals['T']:.1f} is 100.4 or higher" if vitals["T"] >= 100.4 else "",
        f"the heart rate of {vitals['HR']} is above 100" if 100 < vitals["HR"] <= 130 else "",
        f"the systolic blood pressure of {vitals['SBP']} is above 180" if vitals["SBP"] > 180 else "",
    ]
    if any(emergent):
        return f"Emergent. {capitalize_first(join_words([r for r in emergent if r]))}."
    if any(urgent):
        return f"Urgent. {capitalize_first(join_words([r for r in urgent if r]))}."
    return "Non-urgent. All vital signs are within normal limits."


def task_triage(rng: random.Random) -> tuple[str, str, str]:
    problem = rng.choice(PROBLEMS)
    age = rng.randint(24, 88)
    person = rng.choice(["woman", "man"])
    v = triage_vitals(rng)
    text = (
        f"{'An' if str(age).startswith('8') else 'A'} {age} year old {person} comes to the ED. Chief complaint: "
        f"{problem['cc']}. "
        f"Vitals: T {v['T']:.1f} HR {v['HR']} BP {v['SBP']}/{v['DBP']} RR {v['RR']} SpO2 {v['SpO2']}% on RA."
    )
    instruction = rng.choice(
        [
            "Classify the urgency of this emergency department presentation as emergent, urgent or non-urgent "
            "from the vital signs.",
            "Triage: is this presentation emergent, urgent or non-urgent? Give the label and the reason.",
        ]
    )
    return instruction, text, triage_label(v)


def task_cxr_impression(rng: random.Random) -> tuple[str, str, str]:
    key = rng.choice(sorted(CXR_IMPRESSIONS))
    findings = [
        CXR_FINDINGS[key],
        *(CXR_FINDINGS[i] for i in rng.sample(CXR_NEUTRAL_FINDINGS, rng.randint(1, 2))),
    ]
    indication, question = rng.choice(CXR_INDICATIONS)
    text = f"INDICATION: ___ year old patient {indication} // {question}\nFINDINGS: {' '.join(findings)}"
    instruction = rng.choice(
        [
            "Write the impression for this chest radiograph report.",
            "Summarize the findings of the chest X-ray report as a one-line impression.",
        ]
    )
    return instruction, text, f"IMPRESSION: {CXR_IMPRESSIONS[key]}"


def task_summarize_abstract(rng: random.Random) -> tuple[str, str, str]:
    facts = trial_abstract(rng)
    instruction = rng.choice(
        [
            "Summarize the main finding of the abstract in one sentence.",
            "Write a one-sentence summary of this study.",
        ]
    )
    return instruction, facts["text"], trial_summary(facts)


def task_summarize_note(rng: random.Random) -> tuple[str, str, str]:
    case = clinical_case(rng)
    problem = case["problem"]
    excerpt = "\n".join(
        [
            "History of Present Illness:",
            case["presentation"],
            "Brief Hospital Course:",
            f"# {capitalize_first(problem['dx'])}: {capitalize_first(problem['course'])}.",
        ]
    )
    summary = (
        f"{capitalize_first(case['age_phrase'])} was admitted with {problem['dx']}; {problem['course']}."
    )
    instruction = rng.choice(
        [
            "Summarize this discharge note excerpt in one sentence.",
            "Give a one-sentence summary of the admission described below.",
        ]
    )
    return instruction, excerpt, summary


def nli_pair(rng: random.Random) -> tuple[str, str, str, str]:
    """A premise about a patient, a hypothesis, its label and the reason."""
    case = clinical_case(rng)
    premise = case["presentation"]
    person, pmh = case["person"], case["pmh"]
    label = rng.choice(["entailment", "contradiction", "neutral"])
    aspect = rng.choice(["age", "sex", "history"])
    if label == "entailment":
        hypothesis, reason = {
            "age": (f"The patient is {case['age']} years old.", f"the patient is {case['age']} years old"),
            "sex": (f"The patient is a {person}.", f"the patient is a {person}"),
            "history": (f"The patient has a history of {pmh[-1]}.", f"a history of {pmh[-1]}"),
        }[aspect]
        return premise, hypothesis, label, f"Entailment. The premise states {reason}."
    if label == "contradiction":
        other_age = case["age"] + rng.choice([-1, 1]) * rng.randint(3, 15)
        other_person = "man" if person == "woman" else "woman"
        hypothesis, reason = {
            "age": (
                f"The patient is {other_age} years old.",
                f"the patient is {case['age']}, not {other_age}",
            ),
            "sex": (f"The patient is a {other_person}.", f"the patient is a {person}"),
            "history": (f"The patient has no history of {pmh[0]}.", f"a history of {pmh[0]}"),
        }[aspect]
        return premise, hypothesis, label, f"Contradiction. The premise states {reason}."
    hypothesis = rng.choice(
        [
            f"The patient has a family history of {rng.choice(DISEASES)}.",
            f"The patient is allergic to {rng.choice(['penicillin', 'sulfa drugs', 'codeine'])}.",
            "The patient lives alone.",
            f"The patient was admitted to the {rng.choice(sorted(set(SERVICES))).lower()} service.",
        ]
    )
    return premise, hypothesis, label, "Neutral. The premise does not say whether this is true."


def task_nli(rng: random.Random) -> tuple[str, str, str]:
    premise, hypothesis, _label, answer = nli_pair(rng)
    instruction = rng.choice(
        [
            "Does the premise entail the hypothesis? Answer entailment, contradiction or neutral.",
            "Natural language inference: label the relation between the premise and the hypothesis as "
            "entailment, contradiction or neutral.",
        ]
    )
    return instruction, f"Premise: {premise}\nHypothesis: {hypothesis}", answer


def task_case_reasoning(rng: random.Random) -> tuple[str, str, str]:
    question, context, answer = qa_case_diagnosis(rng)
    instruction = rng.choice(
        [
            "Read the clinical case and give the most likely diagnosis with a one-line rationale.",
            "What is the most likely diagnosis? Explain briefly.",
        ]
    )
    return instruction, context, answer


def task_knowledge(rng: random.Random) -> tuple[str, str, str]:
    question, _context, answer = qa_knowledge(rng)
    return question, "", answer


def task_case_writeup(rng: random.Random) -> tuple[str, str, str]:
    """Long output (about 150-250 words): a case write-up from a list of facts."""
    case = clinical_case(rng)
    problem, pronoun = case["problem"], case["pronoun"]
    meds = sorted(rng.sample(HOME_MEDS, rng.randint(3, 6)))
    disposition = rng.choice(DISPOSITIONS)
    allergy = rng.choice(ALLERGIES)
    independent = rng.random() < 0.6
    follow_up = rng.randint(5, 21)
    facts = "\n".join(
        [
            f"Patient: {case['age_phrase']}",
            f"Past medical history: {', '.join(case['pmh'])}",
            f"Allergies: {allergy}",
            f"Presentation: {problem['hpi']} for {case['days']} day{'s' if case['days'] > 1 else ''}",
            f"ED vitals: {case['vitals']}",
            f"Labs: {problem['labs']}",
            f"Imaging: {problem['imaging']}",
            f"ED treatment: {problem['ed']}",
            f"Diagnosis: {problem['dx']}",
            f"Hospital course: {problem['course']}",
            f"Home medications: {'; '.join(meds)}",
            f"Discharge condition: alert, clear and coherent; ambulatory, "
            f"{'independent' if independent else 'requires assistance'}",
            f"Disposition: {disposition}",
            f"Follow-up: PCP in {follow_up} days",
        ]
    )
    stable = " ".join(
        f"{capitalize_first(item)} was stable and the home regimen was continued." for item in case["pmh"]
    )
    writeup = "\n\n".join(
        [
            f"HISTORY: {case['presentation']} Allergies: {allergy}.",
            f"PRESENTATION: In the emergency department, initial vitals were {case['vitals']}. Labs were "
            f"notable for {problem['labs']}. {capitalize_first(problem['imaging'])}. {pronoun} was given "
            f"{problem['ed']} and admitted for further management.",
            f"ASSESSMENT: The presentation is most consistent with {problem['dx']}. {case_rationale(case)}",
            f"HOSPITAL COURSE: {capitalize_first(problem['course'])}. {stable}",
            f"MEDICATIONS: {pronoun} will continue {join_words(meds)}.",
            f"CONDITION AT DISCHARGE: {pronoun} was alert, clear and coherent, and ambulatory "
            f"{'independently' if independent else 'with assistance'}.",
            f"DISPOSITION: Discharged to {disposition.lower()} in stable condition, with follow-up with the "
            f"PCP in {follow_up} days. {problem['advice']}",
        ]
    )
    instruction = rng.choice(
        [
            "Write a structured case summary (history, presentation, assessment, hospital course, medications, "
            "condition, disposition) from these facts.",
            "Turn the admission facts into a short case write-up for the discharge summary.",
        ]
    )
    return instruction, facts, long_output(writeup)


def task_abstract_writeup(rng: random.Random) -> tuple[str, str, str]:
    """Long output (about 150-250 words): a structured abstract from a study's key facts."""
    facts = trial_abstract(rng)
    year1 = rng.randint(1998, 2019)
    year2 = year1 + rng.randint(1, 5)
    setting = rng.choice(SETTINGS)
    youngest, oldest, women_only = POPULATIONS[facts["population"]]
    n_total = facts["n_total"]
    n_women = n_total if women_only else rng.randint(n_total // 5, n_total * 4 // 5)
    mean_age = f"{rng.uniform(youngest, oldest):.1f}"
    pct_a, pct_b = f"{rng.uniform(2, 30):.1f}", f"{rng.uniform(2, 30):.1f}"
    drug, comparator, outcome = facts["drug"], facts["comparator"], facts["outcome"]
    result_line = (
        f"{facts['measure']} {facts['est']}; 95% CI {facts['low']} to {facts['high']}; {facts['p_value']}"
    )
    details = "\n".join(
        [
            f"Design: {facts['design']} {setting}, {year1}-{year2}",
            f"Participants: {n_total} {facts['population']} with {facts['disease']} ({n_women} women, mean age "
            f"{mean_age} years)",
            f"Intervention: {drug} ({DRUGS[drug]}) versus {comparator}",
            f"Primary outcome: {outcome}",
            f"Result: {result_line}",
            f"Adverse events: {pct_a}% with {drug}, {pct_b}% with {comparator}",
        ]
    )
    if facts["finding"] == "maybe":
        result = f"The risk of {outcome} did not differ significantly between groups ({result_line})."
        conclusion = (
            f"In {facts['population']} with {facts['disease']}, {drug} did not change the risk of {outcome}."
        )
    else:
        effect = "lower" if facts["finding"] == "yes" else "higher"
        result = f"{capitalize_first(drug)} was associated with a {effect} risk of {outcome} ({result_line})."
        conclusion = (
            f"In {facts['population']} with {facts['disease']}, {drug} was associated with a {effect} risk of "
            f"{outcome} compared with {comparator}."
        )
    abstract = "\n".join(
        [
            f"BACKGROUND: {capitalize_first(facts['disease'])} affects a growing number of {facts['population']} "
            f"worldwide. The effect of {drug} on {outcome} in {facts['population']} with {facts['disease']} "
            "remains uncertain.",
            f"METHODS: We conducted a {facts['design']} {setting} between {year1} and {year2}. A total of {n_total} "
            f"{facts['population']} with {facts['disease']} received {drug} ({DRUGS[drug]}) or {comparator}. The "
            f"primary outcome was {outcome}. Analyses followed the intention-to-treat principle.",
            f"RESULTS: Of the {n_total} participants, {n_women} ({100 * n_women / n_total:.1f}%) were women and the "
            f"mean age was {mean_age} years. {result} Adverse events occurred in {pct_a}% of the {drug} group and "
            f"{pct_b}% of the {COMPARATORS[comparator]} group.",
            f"CONCLUSIONS: {conclusion} Larger trials with longer follow-up are needed to confirm these results.",
        ]
    )
    instruction = (
        "Write a structured abstract (BACKGROUND, METHODS, RESULTS, CONCLUSIONS) from these study details."
    )
    return instruction, details, long_output(abstract)


# Task -> weight in medinstruct_alpaca.jsonl; the two long write-ups together are about 2% of the records.
ALPACA_TASKS = [
    (task_medqa, 10),
    (task_pubmedqa, 8),
    (task_ner, 12),
    (task_relation, 10),
    (task_note_section, 6),
    (task_triage, 6),
    (task_cxr_impression, 4),
    (task_summarize_abstract, 4),
    (task_summarize_note, 6),
    (task_nli, 10),
    (task_case_reasoning, 8),
    (task_knowledge, 6),
    (task_case_writeup, 1),
    (task_abstract_writeup, 1),
]


def alpaca_record(rng: random.Random) -> dict[str, str]:
    tasks, weights = zip(*ALPACA_TASKS)
    instruction, input_text, output = rng.choices(tasks, weights)[0](rng)
    return {"instruction": instruction, "input": input_text, "output": output}


def user_turn(instruction: str, input_text: str) -> str:
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def chat_case(rng: random.Random) -> list[tuple[str, str]]:
    case = clinical_case(rng)
    problem = case["problem"]
    return [
        (
            f"{case['text']}\n\nWhat is the most likely diagnosis?",
            f"{capitalize_first(problem['dx'])}. {case_rationale(case)}",
        ),
        (
            "What should be given in the emergency department?",
            f"Initial treatment in the ED is {problem['ed']}.",
        ),
        (
            "What advice should the patient get at discharge?",
            f"{problem['advice']} Keep all follow-up appointments.",
        ),
    ]


def chat_abstract(rng: random.Random) -> list[tuple[str, str]]:
    facts = trial_abstract(rng)
    significant = facts["finding"] != "maybe"
    return [
        (f"Summarize this abstract in one sentence.\n\n{facts['text']}", trial_summary(facts)),
        ("What was the primary outcome?", f"The primary outcome was {facts['outcome']}."),
        (
            "Was the result statistically significant?",
            f"{'Yes' if significant else 'No'}: {facts['p_value']} with a 95% CI of {facts['low']} to "
            f"{facts['high']}.",
        ),
    ]


def chat_entities(rng: random.Random) -> list[tuple[str, str]]:
    sentence = relation_sentence(rng)
    return [
        (f"Which drugs are mentioned here?\n\n{sentence['text']}", f"Drugs: {', '.join(sentence['drugs'])}"),
        ("Which drug is given for which disease?", relation_answer(sentence["pairs"])),
        ("Were any drugs stopped?", sentence["fate"]),
    ]


CHAT_CONVERSATIONS = [chat_case, chat_abstract, chat_entities]


def chat_record(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(INSTRUCT_SYSTEM_PROMPTS)})
    if rng.random() < 0.33:
        turns = rng.choice(CHAT_CONVERSATIONS)(rng)[: rng.randint(2, 3)]
    else:
        record = alpaca_record(rng)
        turns = [(user_turn(record["instruction"], record["input"]), record["output"])]
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def first_user_message(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


# --------------------------------------------------------------------------------------------------------
# Splitting and writing
# --------------------------------------------------------------------------------------------------------


def split_heldout(rng: random.Random, items: list, heldout_count: int) -> tuple[list, list]:
    heldout_index = set(rng.sample(range(len(items)), heldout_count))
    train = [item for i, item in enumerate(items) if i not in heldout_index]
    heldout = [item for i, item in enumerate(items) if i in heldout_index]
    return train, heldout


def jsonl_bytes(records: list[dict]) -> bytes:
    # ensure_ascii=False keeps "°C" and "µg" as UTF-8 so readers meet real multi-byte characters.
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def gzip_bytes(data: bytes) -> bytes:
    # mtime=0 and no file name in the header: the only way gzip output is reproducible run to run.
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def zstd_bytes(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def parquet_bytes(records: list[dict[str, str]], columns: list[str]) -> bytes:
    # A table built from plain lists carries no pandas metadata, and every writer option that could vary is
    # spelled out. The footer names the pyarrow version ("created_by"), so the bytes are reproducible for one
    # pyarrow version, not across versions.
    table = pa.table({column: pa.array([r[column] for r in records], type=pa.string()) for column in columns})
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=len(records),
        version="2.6",
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=False,
        write_statistics=False,
        write_page_index=False,
        store_schema=True,
    )
    return sink.getvalue().to_pybytes()


MIMIC_COLUMNS = [
    "note_id",
    "subject_id",
    "hadm_id",
    "note_type",
    "note_seq",
    "charttime",
    "storetime",
    "text",
]


def csv_bytes(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    # QUOTE_MINIMAL quotes the multi-line text field (as in MIMIC-IV-Note); "\n" line ends like the release.
    writer = csv.DictWriter(buffer, fieldnames=MIMIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_pubmed(out: Path) -> list[str]:
    rng = random.Random(PUBMED_SEED)
    texts = unique_documents(lambda: pubmed_abstract(rng), PUBMED_TRAIN_DOCS + PUBMED_HELDOUT_DOCS)
    # Synthetic PMIDs from a range above today's real ones, so none of them names a real article.
    pmids = sorted(rng.sample(range(90_000_000, 99_999_999), len(texts)))
    records = [{"pmid": str(pmid), "text": text} for pmid, text in zip(pmids, texts, strict=True)]
    train, heldout = split_heldout(rng, records, PUBMED_HELDOUT_DOCS)
    half = len(train) // 2
    # Two train shards in two formats on purpose: readers must handle plain and gzipped JSONL in one glob.
    write(out / "pubmed/train/part-0000.jsonl", jsonl_bytes(train[:half]))
    write(out / "pubmed/train/part-0001.jsonl.gz", gzip_bytes(jsonl_bytes(train[half:])))
    write(out / "pubmed/heldout.jsonl", jsonl_bytes(heldout))
    return [record["text"] for record in train]


def build_mimic(out: Path) -> list[str]:
    rng = random.Random(MIMIC_SEED)
    total = MIMIC_TRAIN_NOTES + MIMIC_HELDOUT_NOTES
    notes = unique_documents(lambda: discharge_note(rng), total, text_of=lambda note: note["text"])
    # One note per synthetic patient and admission, so held-out notes share no subject with train ones.
    subject_ids = sorted(rng.sample(range(10_000_000, 19_999_999), total))
    hadm_ids = rng.sample(range(20_000_000, 29_999_999), total)
    rows: list[dict] = []
    for subject_id, hadm_id, note in zip(subject_ids, hadm_ids, notes, strict=True):
        note_seq = rng.randint(2, 40)
        rows.append(
            {
                "note_id": f"{subject_id}-DS-{note_seq}",
                "subject_id": subject_id,
                "hadm_id": hadm_id,
                "note_type": "DS",
                "note_seq": note_seq,
                **note,
            }
        )
    train, heldout = split_heldout(rng, rows, MIMIC_HELDOUT_NOTES)
    write(out / "mimic/discharge.csv.gz", gzip_bytes(csv_bytes(train)))
    write(out / "mimic/heldout.csv.gz", gzip_bytes(csv_bytes(heldout)))

    cxr_rng = random.Random(CXR_SEED)
    reports = unique_documents(lambda: cxr_report(cxr_rng), MIMIC_CXR_REPORTS)
    study_ids = sorted(cxr_rng.sample(range(50_000_000, 59_999_999), len(reports)))
    for study_id, report in zip(study_ids, reports, strict=True):
        # MIMIC-CXR names each report after its study id; the patient-folder nesting is left out.
        write(out / f"mimic/cxr/s{study_id}.txt", report.encode("utf-8"))
    return [row["text"] for row in train]


def build_redpajama(out: Path) -> list[str]:
    rng = random.Random(REDPAJAMA_SEED)
    texts = unique_documents(lambda: general_document(rng), REDPAJAMA_TRAIN_DOCS + REDPAJAMA_HELDOUT_DOCS)
    records = [{"text": text, "meta": {"source": "synthetic"}} for text in texts]
    train, heldout = split_heldout(rng, records, REDPAJAMA_HELDOUT_DOCS)
    write(out / "redpajama/part-0000.jsonl.zst", zstd_bytes(jsonl_bytes(train)))
    write(out / "redpajama/heldout.jsonl", jsonl_bytes(heldout))
    return [record["text"] for record in train]


def alpaca_key(record: dict[str, str]) -> str:
    return user_turn(record["instruction"], record["input"])


def check_output_lengths(name: str, outputs: list[str]) -> None:
    longest = INSTRUCT_LONG_OUTPUT_WORDS[1]
    too_long = [text[:60] for text in outputs if word_count(text) > longest]
    if too_long or not all(text.strip() for text in outputs):
        raise RuntimeError(f"{name}: empty outputs or outputs over {longest} words: {too_long}")


def build_instruct(out: Path) -> dict[str, list[str]]:
    """Instruction data; returns the full text of each file's train records (for the token count print)."""
    rng = random.Random(INSTRUCT_SEED)
    total = INSTRUCT_ALPACA_TRAIN + INSTRUCT_ALPACA_HELDOUT
    alpaca = unique_documents(lambda: alpaca_record(rng), total, text_of=alpaca_key)
    train, heldout = split_heldout(rng, alpaca, INSTRUCT_ALPACA_HELDOUT)
    # The chats and QA pairs never repeat an alpaca prompt, so no file's held-out split is in another's
    # train split (short knowledge questions are the only prompts likely to recur).
    alpaca_prompts = {alpaca_key(record) for record in alpaca}
    alpaca_inputs = [record["input"] for record in alpaca]

    chat_rng = random.Random(CHAT_SEED)

    def new_chat() -> dict:
        while True:
            record = chat_record(chat_rng)
            if first_user_message(record) not in alpaca_prompts:
                return record

    chats = unique_documents(
        new_chat, INSTRUCT_CHAT_TRAIN + INSTRUCT_CHAT_HELDOUT, text_of=first_user_message
    )
    chat_train, chat_heldout = split_heldout(chat_rng, chats, INSTRUCT_CHAT_HELDOUT)

    qa_rng = random.Random(QA_SEED)

    def new_qa_pair() -> dict:
        while True:
            record = qa_pair(qa_rng)
            context = record["context"]
            if context and not any(context in text for text in alpaca_inputs):
                return record
            if not context and record["question"] not in alpaca_prompts:
                return record

    qa = unique_documents(
        new_qa_pair, INSTRUCT_QA_PAIRS, text_of=lambda r: user_turn(r["question"], r["context"])
    )

    check_output_lengths("alpaca", [r["output"] for r in alpaca])
    check_output_lengths(
        "chat", [m["content"] for r in chats for m in r["messages"] if m["role"] == "assistant"]
    )
    check_output_lengths("qa", [r["answer"] for r in qa])
    write(out / "instruct/medinstruct_alpaca.jsonl", jsonl_bytes(train))
    write(out / "instruct/clinical_chat.jsonl", jsonl_bytes(chat_train))
    write(out / "instruct/qa_pairs.parquet", parquet_bytes(qa, ["question", "context", "answer"]))
    write(out / "instruct/heldout/medinstruct_alpaca.jsonl", jsonl_bytes(heldout))
    write(out / "instruct/heldout/clinical_chat.jsonl", jsonl_bytes(chat_heldout))
    return {
        "alpaca": [f"{alpaca_key(r)}\n\n{r['output']}" for r in train],
        "chat": ["\n\n".join(m["content"] for m in r["messages"]) for r in chat_train],
        "qa": [f"{user_turn(r['question'], r['context'])}\n\n{r['answer']}" for r in qa],
    }


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------


def training_lines(texts: list[str]) -> Iterator[str]:
    # sentencepiece silently drops "sentences" longer than max_sentence_length (4192 bytes), and a whole
    # discharge summary is longer than that, so it is fed one line at a time.
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def build_tokenizer(out: Path, train_texts: list[str]) -> None:
    from transformers import AutoTokenizer  # heavy import, only needed here

    spm.set_random_generator_seed(TOKENIZER_SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(train_texts),
        model_writer=model,
        # The LLaMA-2 tokenizer's trainer settings, at a vocabulary a 2-layer test model can afford.
        model_type="bpe",
        vocab_size=TOKENIZER_VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # One thread and the full input (no sampling) make the learned merges reproducible.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    tok_dir = out / "tokenizer"
    write(tok_dir / "tokenizer.model", model.getvalue())
    # transformers 5 only builds the vocabulary when it is loaded from a directory holding tokenizer.model;
    # LlamaTokenizer(vocab_file=...) quietly gives a 3-token vocabulary.
    write(tok_dir / "tokenizer_config.json", b'{"tokenizer_class": "LlamaTokenizer"}\n')
    # transformers 5 defaults add_bos_token to False and does not save the flag in tokenizer_config.json;
    # what survives is the post-processor written into tokenizer.json. Asking for BOS here bakes LLaMA's
    # "<s> first" behaviour into that file.
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), add_bos_token=True, add_eos_token=False)
    tokenizer.save_pretrained(str(tok_dir))
    config_path = tok_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # Loader bookkeeping that save_pretrained writes back out; it describes this machine's load, not the
    # tokenizer.
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    check_tokenizer(tok_dir, model.getvalue())


def check_tokenizer(tok_dir: Path, model_proto: bytes) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    problems = []
    if len(tokenizer) != TOKENIZER_VOCAB_SIZE or processor.get_piece_size() != TOKENIZER_VOCAB_SIZE:
        problems.append(
            f"vocab size {len(tokenizer)} / {processor.get_piece_size()} != {TOKENIZER_VOCAB_SIZE}"
        )
    if (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) != ("<s>", "</s>", "<unk>"):
        problems.append(
            f"special tokens {tokenizer.bos_token!r} {tokenizer.eos_token!r} {tokenizer.unk_token!r}"
        )
    if (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) != (0, 1, 2):
        problems.append("special ids are not unk=0 bos=1 eos=2")
    sample = "The patient was given 40 mg of furosemide.\nHe felt better at 180°C."
    ids = tokenizer(sample, add_special_tokens=False).input_ids
    if ids != processor.encode(sample):
        problems.append("transformers and sentencepiece disagree on the sample sentence")
    if tokenizer.decode(ids) != sample:
        problems.append(f"round trip failed: {tokenizer.decode(ids)!r}")
    if tokenizer(sample).input_ids != [1, *ids]:
        problems.append("the tokenizer does not put <s> (and only <s>) around a sequence by default")
    if problems:
        raise SystemExit("tokenizer check failed:\n" + "\n".join(problems))


def token_counts(tok_dir: Path, texts_by_source: dict[str, list[str]]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    for source, texts in texts_by_source.items():
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
        print(
            f"{source:10s} docs={len(texts):5d} tokens={sum(lengths):8d} "
            f"min={min(lengths):4d} mean={sum(lengths) / len(lengths):6.1f} max={max(lengths):4d}"
        )


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="sample data directory to (re)write")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in GENERATED_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)

    texts_by_source = {
        "pubmed": build_pubmed(out),
        "mimic": build_mimic(out),
        "redpajama": build_redpajama(out),
    }
    # Train splits only, in a fixed source order: held-out text must stay unseen by the tokenizer too.
    all_train = [text for texts in texts_by_source.values() for text in texts]
    build_tokenizer(out, all_train)
    # After the tokenizer, and not in its training text: instruction data must not change the tokenizer.
    instruct_texts = build_instruct(out)
    token_counts(out / "tokenizer", texts_by_source)
    print("instruction data (train records, prompt + answer):")
    token_counts(out / "tokenizer", instruct_texts)
    print(f"total size on disk: {directory_size(out)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
