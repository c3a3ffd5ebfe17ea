"""Hand-made explanations for the parts and metrics tests."""


from fgvce_lightning.engine.results import Edit, Explanation


def make_edit(query_cells, reference_cells, ref_id=(0, 0, 0), p_true=0.5, p_pred=0.3):
    return Edit(query_cells=tuple(map(tuple, query_cells)), reference_slot=0,
                reference_id=tuple(ref_id), reference_cells=tuple(map(tuple, reference_cells)),
                similarity=0.9, contribution=1.0, p_true_after=p_true, p_pred_after=p_pred)


def make_explanation(query_index, edits, true=1, pred=2, success=True, contributions=None):
    return Explanation(query_index=query_index, true=true, pred=pred, success=success,
                       final_pred=true if success else pred, edits=tuple(edits),
                       p_true_before=0.1, p_pred_before=0.8, contributions=contributions)


def skipped(query_index, true=1, pred=2):
    return Explanation.skipped_query(query_index, true, pred, reason="empty bank for class 1")
