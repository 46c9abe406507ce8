"""nbgrader configuration shipped with the course (read by `nbgrader` run from this folder, or copied
into an nbgrader course folder). It makes `nbgrader generate_assignment` produce the same student
version as `python -m course_lib.student`:

- the code stub raises NotImplementedError with "not implemented yet", which the course's checkers
  report in one line (so Run All goes on past an unsolved exercise);
- cells tagged "hide-in-student" (worked examples or library listings that show an exercise's answer)
  are removed;
- "# NBVAL_CHECK_OUTPUT" markers are harmless in a student version; outputs are cleared as usual.

Layout: nbgrader wants `source/<assignment>/<notebook>.ipynb` under the course folder, e.g.
`source/ch03/03_tiling_flash_attention.ipynb` (TEACHING.md shows the commands).
"""

c = get_config()  # noqa: F821 - provided by traitlets when nbgrader loads this file

c.ClearSolutions.code_stub = {"python": '# YOUR CODE HERE\nraise NotImplementedError("not implemented yet")'}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

c.TagRemovePreprocessor.enabled = True
c.TagRemovePreprocessor.remove_cell_tags = ["hide-in-student"]
c.GenerateAssignment.preprocessors = [
    "nbconvert.preprocessors.TagRemovePreprocessor",
    "nbgrader.preprocessors.IncludeHeaderFooter",
    "nbgrader.preprocessors.InstantiateTests",
    "nbgrader.preprocessors.LockCells",
    "nbgrader.preprocessors.ClearSolutions",
    "nbgrader.preprocessors.ClearOutput",
    "nbgrader.preprocessors.CheckCellMetadata",
    "nbgrader.preprocessors.ComputeChecksums",
    "nbgrader.preprocessors.SaveCells",
    "nbgrader.preprocessors.ClearHiddenTests",
    "nbgrader.preprocessors.ClearMarkScheme",
    "nbgrader.preprocessors.ComputeChecksums",
    "nbgrader.preprocessors.CheckCellMetadata",
]
