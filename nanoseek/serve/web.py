"""The chat page served at `/`: one self-contained page (no CDN, works offline) on the same OpenAI API — streaming,
the thinking in a collapsible block, the conversation kept, a stop button, thinking budget and temperature."""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>nanoseek chat</title>
<style>
 body{font:15px/1.5 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
 header{padding:10px 16px;background:#1d2330;color:#fff;display:flex;gap:16px;align-items:center;flex-wrap:wrap}
 header b{font-size:17px} header label{font-size:13px;opacity:.9} header input{width:64px}
 #log{max-width:820px;margin:0 auto;padding:16px 16px 120px}
 .msg{margin:12px 0;padding:10px 14px;border-radius:10px;white-space:pre-wrap;word-wrap:break-word}
 .user{background:#dfe9ff;margin-left:60px} .assistant{background:#fff;border:1px solid #e2e5ea;margin-right:60px}
 details.think{color:#667;font-size:13px;border-left:3px solid #ccd;padding-left:8px;margin-bottom:6px}
 details.think summary{cursor:pointer} .err{color:#b00020}
 form{position:fixed;bottom:0;left:0;right:0;background:#fff;border-top:1px solid #ddd;padding:10px;display:flex;gap:8px}
 textarea{flex:1;height:52px;font:inherit;padding:6px} button{padding:0 18px;font:inherit}
</style></head><body>
<header><b>nanoseek</b><span id="model">__MODEL__</span>
 <label>thinking budget <input id="budget" type="number" min="0" value="256"></label>
 <label>temperature <input id="temp" type="number" min="0" max="2" step="0.1" value="0.6"></label>
 <label>max tokens <input id="maxtok" type="number" min="1" value="512"></label>
 <label>API key <input id="key" type="password" style="width:110px"></label></header>
<div id="log"></div>
<form id="f"><textarea id="q" placeholder="Ask something; Enter sends, Shift+Enter for a new line"></textarea>
<button id="send" type="submit">Send</button><button id="stop" type="button" disabled>Stop</button></form>
<script>
const log=document.getElementById('log'),q=document.getElementById('q'),send=document.getElementById('send'),
      stopb=document.getElementById('stop');
const history=[]; let ctrl=null;
function bubble(role){const d=document.createElement('div');d.className='msg '+role;log.appendChild(d);return d}
q.addEventListener('keydown',e=>{if(e.key==='Enter'&&!e.shiftKey){e.preventDefault();document.getElementById('f').requestSubmit()}});
stopb.onclick=()=>{if(ctrl)ctrl.abort()};
document.getElementById('f').onsubmit=async e=>{
 e.preventDefault(); const text=q.value.trim(); if(!text||ctrl)return; q.value='';
 history.push({role:'user',content:text}); bubble('user').textContent=text;
 const box=bubble('assistant'); const think=document.createElement('details'); think.className='think'; think.open=true;
 think.innerHTML='<summary>thinking</summary><div class="tt"></div>'; const tt=think.querySelector('.tt');
 const ans=document.createElement('div'); ans.className='answer'; box.appendChild(think); box.appendChild(ans);
 ctrl=new AbortController(); send.disabled=true; stopb.disabled=false; let content='', thought=false;
 const body={messages:history,stream:true,temperature:+document.getElementById('temp').value,
   max_tokens:+document.getElementById('maxtok').value,thinking_budget:+document.getElementById('budget').value};
 const headers={'Content-Type':'application/json'}; const key=document.getElementById('key').value;
 if(key)headers['Authorization']='Bearer '+key;
 try{
  const r=await fetch('/v1/chat/completions',{method:'POST',headers,body:JSON.stringify(body),signal:ctrl.signal});
  if(!r.ok){const j=await r.json().catch(()=>({}));throw new Error((j.error&&j.error.message)||r.statusText)}
  const rd=r.body.getReader(),dec=new TextDecoder(); let buf='';
  for(;;){const {value,done}=await rd.read(); if(done)break; buf+=dec.decode(value,{stream:true});
   let i; while((i=buf.indexOf('\n\n'))>=0){const line=buf.slice(0,i).trim(); buf=buf.slice(i+2);
    if(!line.startsWith('data:'))continue; const data=line.slice(5).trim(); if(data==='[DONE]')continue;
    const ch=JSON.parse(data); for(const c of ch.choices||[]){const d=c.delta||{};
     if(typeof d.reasoning_content==='string'){thought=true; tt.textContent+=d.reasoning_content}
     if(d.content){content+=d.content; ans.textContent=content; think.open=false}}
    window.scrollTo(0,document.body.scrollHeight)}}
 }catch(err){if(err.name!=='AbortError'){const p=document.createElement('div');p.className='err';
   p.textContent='error: '+err.message;box.appendChild(p)}}
 if(!tt.textContent){if(thought)tt.textContent='(the thinking budget ran out before a whole line)'; else think.remove()}
 history.push({role:'assistant',content}); ctrl=null; send.disabled=false; stopb.disabled=true; q.focus();
};
</script></body></html>
"""
