"""Scoped stylesheet for RunWidget.

Every selector starts with a ``jh-`` class so nothing leaks into the rest of the page, and every
colour is a JupyterLab CSS variable (with a light-theme fallback), so the widget follows the
light and dark themes in JupyterLab 4 and Notebook 7 without a front-end build.
"""
from __future__ import annotations

CSS = """
.jh-run {
  border: 1px solid var(--jp-border-color2, #e0e0e0);
  border-radius: 6px;
  padding: 8px 10px 6px 10px;
  margin: 2px 0;
  background: var(--jp-layout-color1, #fff);
  color: var(--jp-ui-font-color1, rgba(0,0,0,.87));
  font-family: var(--jp-ui-font-family, system-ui, -apple-system, "Segoe UI", sans-serif);
  font-size: var(--jp-ui-font-size1, 13px);
  box-sizing: border-box;
  max-width: 100%;
}
.jh-run .widget-html-content { line-height: 1.45; white-space: normal; }
.jh-run .widget-html, .jh-run .widget-html-content { height: auto; }
.jh-header { display: flex; align-items: center; gap: 8px; flex-wrap: wrap; }
.jh-goal { font-weight: 600; font-size: var(--jp-ui-font-size2, 15px); overflow-wrap: anywhere; }
.jh-badge {
  display: inline-block; padding: 0 9px; border-radius: 10px; line-height: 19px;
  font-size: 11px; font-weight: 600; letter-spacing: .02em; white-space: nowrap;
  color: var(--jp-layout-color1, #fff); background: var(--jp-ui-font-color2, #616161);
}
.jh-badge.jh-s-running, .jh-badge.jh-s-queued, .jh-badge.jh-s-restoring {
  color: #fff; background: var(--jp-brand-color0, #1976d2); }
.jh-badge.jh-s-completed { color: #fff; background: var(--jp-success-color0, #388e3c); }
.jh-badge.jh-s-failed { color: #fff; background: var(--jp-error-color0, #d32f2f); }
.jh-badge.jh-s-waiting_input, .jh-badge.jh-s-paused {
  color: #fff; background: var(--jp-warn-color0, #e65100); }
.jh-badge.jh-s-handed_off { color: #fff; background: var(--jp-info-color0, #00838f); }
.jh-meta { color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); font-size: var(--jp-ui-font-size0, 11px);
  margin-top: 2px; overflow-wrap: anywhere; }
.jh-meta a { color: var(--jp-content-link-color, var(--jp-brand-color1, #1976d2)); }
.jh-section { font-size: 11px; font-weight: 600; text-transform: uppercase; letter-spacing: .05em;
  color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); margin: 8px 0 2px 0; }
.jh-plan { list-style: none; margin: 0; padding: 0; }
.jh-plan li { display: flex; gap: 7px; align-items: baseline; padding: 1px 0; }
.jh-ico { display: inline-block; width: 1.1em; text-align: center; flex: none; font-weight: 700; }
.jh-p-pending .jh-ico { color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); font-weight: 400; }
.jh-p-active .jh-ico { color: var(--jp-brand-color1, #1976d2); }
.jh-p-active .jh-txt { font-weight: 600; }
.jh-p-done .jh-ico { color: var(--jp-success-color1, #388e3c); }
.jh-p-done .jh-txt { color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); }
.jh-p-failed .jh-ico, .jh-p-failed .jh-txt { color: var(--jp-error-color1, #d32f2f); }
.jh-spin { animation: jh-spin 1.1s linear infinite; }
@keyframes jh-spin { to { transform: rotate(360deg); } }
@media (prefers-reduced-motion: reduce) { .jh-spin { animation: none; } }
.jh-empty { color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); font-style: italic; }
.jh-log { max-height: 360px; overflow-y: auto; display: flex; flex-direction: column-reverse; }
.jh-step { border-left: 2px solid var(--jp-border-color2, #e0e0e0); padding: 1px 0 3px 8px; margin: 3px 0; }
.jh-step.jh-note { border-left-color: var(--jp-brand-color1, #1976d2); }
.jh-step.jh-note .jh-tool { color: var(--jp-ui-font-color1, rgba(0,0,0,.87)); }
.jh-step-n { font-size: 11px; color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); }
.jh-words { white-space: pre-wrap; overflow-wrap: anywhere; }
.jh-code {
  font-family: var(--jp-code-font-family, SFMono-Regular, Menlo, Consolas, monospace);
  font-size: var(--jp-code-font-size, 12px); line-height: 1.35;
  color: var(--jp-content-font-color1, rgba(0,0,0,.87));
  background: var(--jp-cell-editor-background, var(--jp-layout-color2, #f5f5f5));
  border: 1px solid var(--jp-border-color2, #e0e0e0); border-radius: 3px;
  padding: 4px 6px; margin: 3px 0; white-space: pre-wrap; overflow-wrap: anywhere;
}
.jh-tool { font-size: 12px; color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); }
.jh-result {
  font-family: var(--jp-code-font-family, monospace); font-size: 11px; line-height: 1.3;
  color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); white-space: pre-wrap; overflow-wrap: anywhere;
  margin: 1px 0 2px 0;   /* no scroll box of its own: results are trimmed, the log scrolls */
}
.jh-result.jh-err { color: var(--jp-error-color1, #d32f2f); }
.jh-img { display: block; max-width: 100%; height: auto; margin: 2px 0; }
.jh-html { font-size: 11px; margin: 2px 0; overflow-x: auto; }   /* wide tables scroll sideways only */
.jh-html table { border-collapse: collapse; }
.jh-html th, .jh-html td { border: 1px solid var(--jp-border-color2, #e0e0e0); padding: 1px 6px; text-align: right; }
.jh-msg { padding: 4px 8px; border-radius: 4px; border-left: 3px solid; margin: 6px 0 2px 0;
  overflow-wrap: anywhere; white-space: pre-wrap; }
.jh-msg a { color: var(--jp-content-link-color, var(--jp-brand-color1, #1976d2)); }
.jh-m-info { border-color: var(--jp-brand-color1, #1976d2);
  background: color-mix(in srgb, var(--jp-brand-color1, #1976d2) 10%, transparent); }
.jh-m-success { border-color: var(--jp-success-color1, #388e3c);
  background: color-mix(in srgb, var(--jp-success-color1, #388e3c) 12%, transparent); }
.jh-m-warn { border-color: var(--jp-warn-color1, #f57c00);
  background: color-mix(in srgb, var(--jp-warn-color1, #f57c00) 14%, transparent); }
.jh-m-error { border-color: var(--jp-error-color1, #d32f2f);
  background: color-mix(in srgb, var(--jp-error-color1, #d32f2f) 12%, transparent); }
.jh-details { margin-top: 4px; white-space: normal; }
.jh-details summary { cursor: pointer; font-size: 11px; color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); }
.jh-details pre { font-size: 11px; max-height: 14em; overflow: auto; margin: 4px 0 0 0;
  color: var(--jp-ui-font-color1, rgba(0,0,0,.87)); white-space: pre; }
.jh-question { font-weight: 600; margin: 6px 0 2px 0; overflow-wrap: anywhere; white-space: pre-wrap; }
.jh-buttons { flex-wrap: wrap; gap: 4px; margin-top: 6px; }
.jh-buttons .jupyter-button, .jh-answer .jupyter-button { margin: 0; }
.jh-progress-label { font-size: 11px; color: var(--jp-ui-font-color2, rgba(0,0,0,.54)); }
.jh-run .jh-log-acc { margin-top: 6px; }
/* looked at in JupyterLab light/dark (tests/e2e/test_browser.py screenshots): */
.jh-nw { white-space: nowrap; }
.jh-run .jupyter-widget-Collapse-header { padding: 3px 8px; }
.jh-run .jupyter-widget-Collapse-contents { padding: 4px 10px 6px 10px; }
body[data-jp-theme-light="false"] .jh-code { background: var(--jp-layout-color2, #424242); }
.jh-buttons .jh-btn:enabled { color: var(--jp-ui-font-color1, rgba(0,0,0,.87));
  box-shadow: inset 0 0 0 1px var(--jp-border-color1, #bdbdbd); }
.jh-buttons .jh-btn:disabled { opacity: .5; }
.jh-run .widget-hprogress { height: auto; align-self: center; }
.jh-run .widget-hprogress .progress { height: 6px; border-radius: 3px; }
"""
