"""The wallboard's page: plain HTML and a little JavaScript, Chinese interface text, no data of its own.

It signs in (``POST /api/login``; the session cookie is HttpOnly), then listens to ``/api/wallboard/events``
(Server-Sent Events) and redraws on each snapshot. Waits of waiting calls grow between snapshots on the client.
Calls are shown by category and wait only; the page never receives a caller's number or name.
"""

from __future__ import annotations

from typing import Final

__all__ = ["WALLBOARD_HTML"]

WALLBOARD_HTML: Final = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>热线实时监控</title>
<style>
body{font-family:sans-serif;margin:1em;background:#111;color:#eee}
h1{font-size:1.4em} h2{font-size:1.1em;margin:.6em 0 .3em}
.figs{display:flex;flex-wrap:wrap;gap:1em} .fig{background:#222;padding:.5em 1em;border-radius:6px}
.fig b{display:block;font-size:1.6em} table{border-collapse:collapse} td,th{padding:.2em .8em;text-align:left}
.emergency{color:#ff5252;font-weight:bold} #login{max-width:20em} #login input{display:block;margin:.3em 0;width:100%}
.state-ready{color:#69f0ae}.state-ringing{color:#ffd740}.state-talking{color:#40c4ff}.state-wrap_up{color:#b388ff}
.state-paused{color:#bdbdbd}.state-offline{color:#ff8a65} #status{color:#999;font-size:.9em}
</style></head><body>
<h1>患者热线 · 实时监控</h1>
<form id="login" hidden><input id="account" placeholder="账号" autocomplete="username">
<input id="password" type="password" placeholder="密码" autocomplete="current-password">
<input id="code" placeholder="动态验证码（主管、审计员）" inputmode="numeric" autocomplete="one-time-code">
<button>登录</button><div id="login-error"></div></form>
<div id="board" hidden>
<div class="figs" id="figures"></div>
<h2>排队中的来电</h2><div id="queues"></div>
<h2>坐席状态</h2><table id="agents"></table>
</div><div id="status">连接中…</div>
<script>
"use strict";
const STATES={ready:"空闲",ringing:"振铃",talking:"通话中",wrap_up:"话后处理",paused:"暂停",offline:"离线"};
const OFFLINE={"not registered":"话机未注册",unreachable:"无法接通"};
const CATEGORIES={emergency:"急救",general:"一般咨询",medication:"用药指导",diagnosis:"诊疗",vaccination:"疫苗接种",
adverse_reaction:"不良反应",appointment:"预约",unknown:"未分类"};
let snapshot=null, receivedAt=0;
const $=id=>document.getElementById(id);
const esc=t=>String(t).replace(/[&<>"']/g,c=>"&#"+c.charCodeAt(0)+";");
const pct=v=>v===null?"—":(100*v).toFixed(1)+"%";
const sec=v=>v===null?"—":Math.round(v)+" 秒";
const cat=c=>CATEGORIES[c]||c;
const STAGES={refer:"转办",resolve:"办结",answer:"回访"};
function complaints(c){
  if(!c)return "";
  const o=c.oldest, late=c.overdue>0;
  return '<div class="fig'+(late?" emergency":"")+'" id="complaints-overdue">逾期投诉<b>'+esc(c.overdue)+"</b>"+
    (o?"最久："+esc(STAGES[o.stage]||o.stage)+"逾期 "+esc(o.overdue_hours)+" 小时"+
      (o.department?"（"+esc(o.department)+"）":""):"")+"</div>";
}
function render(){
  if(!snapshot)return;
  const t=snapshot.today, grow=(Date.now()-receivedAt)/1000;
  $("figures").innerHTML=[["今日来电",t.received],["已接听",t.answered],
    ["服务水平（"+t.service_level_seconds+" 秒内）",pct(t.service_level)],["放弃率",pct(t.abandon_rate)],
    ["平均应答速度",sec(t.asa_seconds)],["最长等待",sec(t.longest_wait_seconds)],
    ["急救目标内接听",t.emergencies_within_target+" / "+t.emergencies]]
    .map(([k,v])=>'<div class="fig">'+esc(k)+"<b>"+esc(v)+"</b></div>").join("")+complaints(snapshot.complaints);
  $("queues").innerHTML=snapshot.queues.length?snapshot.queues.map(q=>
    '<div class="queue" data-queue="'+esc(q.queue)+'"><h2 class="'+(q.emergency?"emergency":"")+'">'+esc(cat(q.queue))+
    " · 等待 "+q.waiting+" · 最长 "+Math.round(q.longest_wait_seconds+grow)+" 秒</h2><table>"+
    q.calls.map(c=>'<tr class="call'+(c.emergency?" emergency":"")+'" data-call="'+esc(c.call_id)+'"><td>'+
      esc(cat(c.category))+"</td><td>"+Math.round(c.wait_seconds+grow)+" 秒</td></tr>").join("")+
    "</table></div>").join(""):"<p>无人等待</p>";
  $("agents").innerHTML="<tr><th>坐席</th><th>状态</th></tr>"+snapshot.agents.map(a=>
    '<tr class="agent" data-agent="'+esc(a.agent_id)+'"><td>'+esc(a.agent_id)+
    '</td><td class="state-'+esc(a.state)+'">'+
    esc(STATES[a.state]||a.state)+(a.paused_reason?"（"+esc(a.paused_reason)+"）":"")+
    (a.offline_reason?"（"+esc(OFFLINE[a.offline_reason]||a.offline_reason)+"）":"")+"</td></tr>").join("");
}
function listen(){
  $("login").hidden=true; $("board").hidden=false;
  const source=new EventSource("/api/wallboard/events");
  source.addEventListener("board",e=>{snapshot=JSON.parse(e.data);receivedAt=Date.now();render();
    $("status").textContent="更新于 "+new Date().toLocaleTimeString("zh-CN");});
  source.addEventListener("end",()=>{source.close();showLogin("会话已结束，请重新登录");});
  source.onerror=()=>{$("status").textContent="连接中断，正在重连…";
    fetch("/api/queues").then(r=>{if(r.status===401||r.status===403){source.close();showLogin("请登录");}});};
}
function showLogin(message){$("board").hidden=true;$("login").hidden=false;$("login-error").textContent=message||"";}
$("login").addEventListener("submit",async e=>{e.preventDefault();
  const r=await fetch("/api/login",{method:"POST",headers:{"Content-Type":"application/json"},
    body:JSON.stringify({account:$("account").value,password:$("password").value,code:$("code").value||null})});
  if(r.ok)listen();else showLogin("登录失败");});
fetch("/api/queues").then(r=>r.ok?listen():showLogin());
setInterval(render,1000);
</script></body></html>
"""
