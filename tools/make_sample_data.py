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

# One seed per source, so a template edit in one source does not reshuffle the others.
PUBMED_SEED = 1001
MIMIC_SEED = 2002
CXR_SEED = 3003
REDPAJAMA_SEED = 4004
TOKENIZER_SEED = 5005

TOKENIZER_VOCAB_SIZE = 2048
GZIP_LEVEL = 9
ZSTD_LEVEL = 19
# Generated sub-directories; removed before writing so a renamed file cannot linger. README.md and
# __init__.py in the same directory are hand-written and left alone.
GENERATED_DIRS = ("pubmed", "mimic", "redpajama", "tokenizer")


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
    token_counts(out / "tokenizer", texts_by_source)
    print(f"total size on disk: {directory_size(out)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
