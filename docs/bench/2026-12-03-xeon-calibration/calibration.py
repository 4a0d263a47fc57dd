"""Sums the `batched step` trace lines of a log (SIBYL_LOG=sibyl_decode::scheduler=trace)
by kind of step: prompt steps, and verify steps by sessions and draft tokens. For each: the
tokens given against the tokens expected when the trees were sized, and the time against
the estimate they were sized with. Usage: python3 calibration.py LOG
"""
import re,sys,collections
rx=re.compile(r'(\w+)=([0-9.]+)')
by=collections.defaultdict(lambda: [0,0,0.0,0.0,0.0,0.0])
for line in open(sys.argv[1], errors='replace'):
    if 'batched step' not in line: continue
    f={k:float(v) for k,v in rx.findall(line)}
    if f.get('prompt_tokens',0)>0: key=('prompt',)
    else: key=(int(f['sessions']), int(f['draft_tokens'])>0, min(int(f['draft_tokens']),16))
    b=by[key]; b[0]+=1; b[1]+=f['tokens']; b[2]+=f['expected_tokens']; b[3]+=f['elapsed_ms']; b[4]+=f['estimated_ms']; b[5]+=f['rows']
print('key n tokens/step expected/step tok/exp ms/step est/step elapsed/est rows/step')
for k in sorted(by, key=str):
    n,t,e,el,es,r=by[k]
    print(k, n, round(t/n,2), round(e/n,2), round(t/max(e,1e-9),2), round(el/n,1), round(es/n,1), round(el/max(es,1e-9),2), round(r/n,1))
