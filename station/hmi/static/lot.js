// Lot panel: open/close the lot every item sorted from now on belongs to (operator action, audited),
// and the records' acknowledged (durable) item id. Uses app.js's t(), act(), toast() and $().
"use strict";

function lotText(key, fallbackText, vars) {
  const s = t(key, vars);
  if (s !== key) return s;
  let out = fallbackText;
  if (vars) for (const [k, v] of Object.entries(vars)) out = out.replaceAll(`{${k}}`, v);
  return out;
}

async function refreshLot() {
  let data;
  try { const r = await fetch("/api/lot"); if (!r.ok) return; data = await r.json(); } catch (e) { return; }
  const lot = data.lot;
  $("lot-badge").textContent = lot ? lotText("lot.badge", "Lot {n}", { n: lot.lot_number }) : lotText("lot.none_badge", "No lot");
  $("lot-badge").classList.toggle("lot-open", !!lot);
  $("lot-current").textContent = lot
    ? lotText("lot.current", "Lot {n} open since {t} · {o} · {s} · {r} records on its chain",
              { n: lot.lot_number, t: lot.opened_at, o: lot.origin_country, s: lot.supplier, r: lot.records })
    : lotText("lot.none", "No lot is open: items are recorded without a lot");
  $("lot-durable").textContent = lotText("lot.durable", "Records safe on disk up to item #{id}", { id: data.acknowledged.item_id });
  $("lot-form").hidden = !!lot;
  $("btn-lot-close").hidden = !lot;
}

$("btn-lot").onclick = async () => { await refreshLot(); $("dlg-lot").showModal(); };
$("lot-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const f = new FormData($("lot-form"));
  const body = Object.fromEntries(f.entries());
  const r = await act("/api/lot/open", body);
  if (r) { toast(lotText("lot.opened", "Lot {n} opened", { n: r.lot_number }), true); $("lot-form").reset(); }
  await refreshLot();
};
$("btn-lot-close").onclick = async () => {
  if (!confirm(lotText("lot.confirm_close", "Close the lot? Items sorted after this belong to no lot."))) return;
  const r = await act("/api/lot/close", {});
  if (r) toast(lotText("lot.closed", "Lot {n} closed: {r} records, head {h}", { n: r.lot_number, r: r.records, h: r.head_hash.slice(0, 16) + "…" }), true);
  await refreshLot();
};
refreshLot();
setInterval(refreshLot, 5000);
